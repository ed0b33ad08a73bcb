// Shared-memory arenas and the shm bulk channel, with real /dev/shm files.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "fleet/transport/bulk.h"
#include "fleet/transport/shm_arena.h"

namespace fleet::transport {
namespace {

std::string UniqueName(const char* tag) {
  return std::string("fleet-test-") + tag + "-" + std::to_string(getpid());
}

bool ShmFileExists(const std::string& name) {
  struct stat st {};
  return stat(("/dev/shm/" + name).c_str(), &st) == 0;
}

TEST(ShmArena, RemoveStaleUnlinksArenasOfDeadProcessesOnly) {
  const std::string prefix = UniqueName("stale") + "-";
  // A child creates an arena and dies without its destructor running, as a SIGKILLed worker.
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto leaked = ShmArena::Create(prefix + "dead", 64 << 10, 0);
    _exit(leaked.ok() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_TRUE(ShmFileExists(prefix + "dead"));
  auto live = ShmArena::Create(prefix + "live", 64 << 10, 0);
  ASSERT_TRUE(live.ok()) << live.status();

  // Too young to judge with the default age: nothing goes.
  EXPECT_TRUE(ShmArena::RemoveStale(prefix).empty());
  auto removed = ShmArena::RemoveStale(prefix, std::chrono::seconds(0));
  EXPECT_EQ(removed, std::vector<std::string>{prefix + "dead"});
  EXPECT_FALSE(ShmFileExists(prefix + "dead"));
  EXPECT_TRUE(ShmFileExists(prefix + "live"));  // its owner (this process) holds the lock
  auto block = (*live)->Allocate(ArenaRange::kStaging, 100);
  EXPECT_TRUE(block.ok());
}

// A peer maps the whole arena, whose weights range is as large as the worker's capacity:
// mapping it must not allocate those pages (MAP_POPULATE on tmpfs did, 8 GiB per peer).
TEST(ShmMapping, MappingAPeerArenaAllocatesNothing) {
  const std::string name = UniqueName("sparse");
  auto arena = ShmArena::Create(name, 64 << 10, 1ull << 30);
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto allocated = [&] {
    struct stat st {};
    EXPECT_EQ(stat(("/dev/shm/" + name).c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  };
  const uint64_t before = allocated();
  EXPECT_LE(before, 64u << 10);  // only the staging range
  auto rw = ShmMapping::Open(name, /*writable=*/true);
  auto ro = ShmMapping::Open(name, /*writable=*/false);
  ASSERT_TRUE(rw.ok() && ro.ok());
  EXPECT_EQ(allocated(), before);
  // Copying into a staging range through the peer mapping uses the owner's pages.
  auto block = (*arena)->Allocate(ArenaRange::kStaging, 32 << 10);
  ASSERT_TRUE(block.ok());
  auto dst = (*rw)->At((*block)->offset(), 32 << 10);
  ASSERT_TRUE(dst.ok());
  std::memset(*dst, 7, 32 << 10);
  EXPECT_EQ(allocated(), before);
  EXPECT_EQ((*block)->data()[100], 7);
}

TEST(ShmArena, AllocatesFreesAndCoalesces) {
  auto arena = ShmArena::Create(UniqueName("alloc"), 1 << 20, 1 << 20);
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto a = (*arena)->Allocate(ArenaRange::kStaging, 300 << 10);
  auto b = (*arena)->Allocate(ArenaRange::kStaging, 300 << 10);
  auto c = (*arena)->Allocate(ArenaRange::kStaging, 300 << 10);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ((*a)->offset() % 64, 0u);
  EXPECT_NE((*a)->offset(), (*b)->offset());
  // 900 KiB of 1 MiB used: 300 KiB more does not fit; the error carries the numbers.
  auto d = (*arena)->Allocate(ArenaRange::kStaging, 300 << 10);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(d.status().message().find("307200"), std::string_view::npos) << d.status();
  // Weights come from their own range, above staging.
  auto w = (*arena)->Allocate(ArenaRange::kWeights, 1 << 20);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_GE((*w)->offset(), 1u << 20);
  // Freeing a and b (neighbours) coalesces them into one 600 KiB range.
  a->reset();
  b->reset();
  auto e = (*arena)->Allocate(ArenaRange::kStaging, 600 << 10);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->offset(), 0u);
}

TEST(ShmArena, PeerMappingSeesWritesAndOwnerUnlinks) {
  const std::string name = UniqueName("peer");
  {
    auto arena = ShmArena::Create(name, 64 << 10, 0);
    ASSERT_TRUE(arena.ok());
    EXPECT_TRUE(ShmFileExists(name));
    auto block = (*arena)->Allocate(ArenaRange::kStaging, 100);
    std::memcpy((*block)->data(), "hello", 6);
    auto peer = ShmMapping::Open(name, /*writable=*/false);
    ASSERT_TRUE(peer.ok()) << peer.status();
    auto p = (*peer)->At((*block)->offset(), 6);
    ASSERT_TRUE(p.ok());
    EXPECT_STREQ(reinterpret_cast<const char*>(*p), "hello");
    EXPECT_FALSE((*peer)->At((64 << 10) - 2, 6).ok());
    EXPECT_FALSE((*peer)->At(UINT64_MAX, 2).ok());
  }
  EXPECT_FALSE(ShmFileExists(name));
  EXPECT_FALSE(ShmMapping::Open(name, false).ok());
  EXPECT_FALSE(ShmArena::Create("../etc", 4096, 0).ok());
}

TEST(ShmChannel, CopiesIntoReservationsAndClaimsThem) {
  auto arena = ShmArena::Create(UniqueName("chan"), 4 << 20, 0);
  ASSERT_TRUE(arena.ok());
  ShmReceiver receiver(*arena, std::chrono::seconds(60));
  auto mapping = ShmMapping::Open((*arena)->name(), /*writable=*/true);
  ASSERT_TRUE(mapping.ok());
  auto shm = MakeShmTransport(
      *mapping, [&](std::span<const uint64_t> sizes) { return receiver.Reserve(sizes); });
  std::vector<float> x(1000);
  std::iota(x.begin(), x.end(), 0.5f);
  std::vector<uint8_t> y(77, 9);
  std::vector<OutPayload> out = {
      {x.data(), x.size() * 4, nullptr}, {nullptr, 0, nullptr}, {y.data(), y.size(), nullptr}};
  Frames frames;
  auto refs = shm->Stage(out, frames);
  ASSERT_TRUE(refs.ok()) << refs.status();
  EXPECT_TRUE(frames.empty());
  ASSERT_EQ(refs->size(), 3u);
  EXPECT_EQ((*refs)[1].kind, wire::PayloadKind::None);
  EXPECT_EQ((*refs)[0].kind, wire::PayloadKind::ShmReserved);
  // A sender may only name ranges it was granted.
  EXPECT_EQ(receiver.Claim((*refs)[0].reservation, (*refs)[0].offset + 64, 4).status().code(),
            StatusCode::kOutOfRange);
  EXPECT_FALSE(receiver.Claim((*refs)[0].reservation + 1, (*refs)[0].offset, 4).ok());
  EXPECT_FALSE(receiver.Claim((*refs)[0].reservation, (*refs)[0].offset, 1 << 20).ok());
  auto bx = receiver.Claim((*refs)[0].reservation, (*refs)[0].offset, x.size() * 4);
  ASSERT_TRUE(bx.ok()) << bx.status();
  EXPECT_EQ(std::memcmp((*bx)->data(), x.data(), x.size() * 4), 0);
  EXPECT_FALSE(receiver.Claim((*refs)[0].reservation, (*refs)[0].offset, 4).ok());  // claimed
  auto by = receiver.Claim((*refs)[2].reservation, (*refs)[2].offset, y.size());
  ASSERT_TRUE(by.ok());
  EXPECT_EQ(std::memcmp((*by)->data(), y.data(), y.size()), 0);
  receiver.Finish((*refs)[0].reservation);
  EXPECT_EQ(receiver.pending(), 0u);
}

TEST(ShmChannel, FullArenaIsResourceExhaustedAndReservationsExpire) {
  auto arena = ShmArena::Create(UniqueName("full"), 64 << 10, 0);
  ASSERT_TRUE(arena.ok());
  ShmReceiver receiver(*arena, std::chrono::milliseconds(0));
  const uint64_t big[] = {1 << 20};
  EXPECT_EQ(receiver.Reserve(big).status().code(), StatusCode::kResourceExhausted);
  const uint64_t half[] = {40 << 10};
  ASSERT_TRUE(receiver.Reserve(half).ok());
  EXPECT_EQ((*arena)->used_bytes(), 40u << 10);
  usleep(2000);
  // The unclaimed reservation expired (expiry 0), so this one fits again.
  ASSERT_TRUE(receiver.Reserve(half).ok());
  EXPECT_EQ(receiver.pending(), 1u);
}

}  // namespace
}  // namespace fleet::transport
