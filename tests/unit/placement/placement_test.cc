// Table-driven tests of MakePlan: every grammar, virtual VRAM with 1-3 donors, wildcards,
// GPU-only, CLIP/T5 heads, mixed devices, 12 GPUs, huge and tiny models, and every malformed
// input class of DisTorch2 (docs/placement.md, "Errors"). Cases whose result equals
// DisTorch2's are named UpstreamEqual_*. Every plan that succeeds is also checked against the
// invariants in CheckInvariants (each unit placed once, pinned units on the compute device, one
// contiguous range per other device, nothing on cpu for GPU-only strings, capacities respected).
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fleet/config/bytes.h"
#include "fleet/placement/placement.h"
#include "fleet/placement/units.h"

namespace fleet::placement {
namespace {

constexpr uint64_t kKiB = 1ull << 10;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

// Models by name: "u:N:SIZE" = N units blocks.0.. of SIZE; "flux", "wan" = the built-in
// examples; "clip", "t5" = text encoders (pin rules applied); "firstfit" = sizes where
// DisTorch2's first-fit fills a gap.
std::vector<Unit> MakeModel(const std::string& spec) {
  std::vector<Unit> units;
  auto add = [&](std::string name, uint64_t bytes) {
    Unit u;
    u.name = std::move(name);
    u.bytes = bytes;
    units.push_back(u);
  };
  if (spec.rfind("u:", 0) == 0) {
    size_t colon = spec.find(':', 2);
    int n = std::stoi(spec.substr(2, colon - 2));
    uint64_t size = *config::ParseBytes(spec.substr(colon + 1));
    for (int i = 0; i < n; ++i) add("blocks." + std::to_string(i), size);
  } else if (spec == "flux") {
    return GetExample("flux-dev")->units;
  } else if (spec == "wan") {
    return GetExample("wan21-14b")->units;
  } else if (spec == "clip") {
    add("text_model.embeddings", 48 * kMiB);
    for (int i = 0; i < 12; ++i) add("text_model.encoder.layers." + std::to_string(i), 256 * kMiB);
    add("text_model.final_layer_norm", 4 * kKiB);
    MarkPinnedUnits(families::FindFamily("text-encoder"), &units);
  } else if (spec == "t5") {
    add("shared", 256 * kMiB);
    for (int i = 0; i < 24; ++i) add("encoder.block." + std::to_string(i), 256 * kMiB);
    add("encoder.final_layer_norm", 8 * kKiB);
    MarkPinnedUnits(families::FindFamily("text-encoder"), &units);
  } else if (spec == "firstfit") {
    add("b0", 1 * kGiB);
    add("b1", kGiB / 4);
    add("b2", 2 * kGiB);
    add("b3", 2 * kGiB);
  } else if (spec == "zero") {
    add("a", 0);
    add("b", 1 * kMiB);
    add("c", 0);
  }
  return units;
}

struct Case {
  std::string name = {};
  std::string devices = {};  // ParseDeviceTable text
  std::string model = {};    // MakeModel spec
  std::string compute = "cuda:0";
  double vvram = 4.0;
  std::string donor = "cpu";
  std::string expert = {};
  bool eject = true;
  uint64_t activation = 0;
  // Expectations for a plan.
  std::map<std::string, uint64_t> device_bytes = {};
  std::vector<std::pair<std::string, std::string>> unit_device = {};
  std::optional<std::string> expert_string = {};
  std::optional<std::set<std::string>> deviations = {};
  std::string warning = {};  // substring of some warning
  std::string note = {};     // substring of some note (DisTorch2's log lines)
  std::optional<Mode> mode = {};
  // Expectations for an error (code != kOk).
  StatusCode error = StatusCode::kOk;
  std::vector<std::string> error_has = {};
};

// Properties every plan must have, whatever the request.
void CheckInvariants(const Case& c, const Plan& plan, const std::vector<Unit>& units,
                     const std::vector<device::DeviceInfo>& devices) {
  ASSERT_EQ(plan.assignments.size(), units.size());
  uint64_t model = 0;
  for (size_t i = 0; i < units.size(); ++i) {
    EXPECT_EQ(plan.assignments[i].unit, units[i].name);
    EXPECT_EQ(plan.assignments[i].bytes, units[i].bytes);
    if (units[i].pinned) {
      EXPECT_EQ(plan.assignments[i].device, plan.compute_device) << units[i].name << " is pinned";
    }
    model += units[i].bytes;
  }
  EXPECT_EQ(plan.model_bytes, model);
  ASSERT_EQ(plan.devices.size(), devices.size());
  uint64_t placed = 0;
  std::map<std::string, size_t> free_index;  // unit -> index among non-pinned units
  for (size_t i = 0; i < units.size(); ++i) {
    if (!units[i].pinned) free_index.emplace(units[i].name, free_index.size());
  }
  for (const auto& d : plan.devices) {
    uint64_t bytes = 0;
    for (size_t u : d.units) {
      EXPECT_EQ(plan.assignments[u].device, d.id);
      bytes += plan.assignments[u].bytes;
    }
    EXPECT_EQ(bytes, d.weight_bytes) << d.id.ToString();
    placed += bytes;
    EXPECT_LE(d.weight_bytes + d.headroom_bytes, d.capacity_bytes) << d.id.ToString();
    if (d.id != plan.compute_device) {
      EXPECT_EQ(d.headroom_bytes, 0u);
      // One contiguous range of the non-pinned units.
      for (size_t k = 1; k < d.units.size(); ++k) {
        EXPECT_EQ(free_index[plan.assignments[d.units[k]].unit],
                  free_index[plan.assignments[d.units[k - 1]].unit] + 1)
            << d.id.ToString() << " holds more than one range";
      }
    }
  }
  EXPECT_EQ(placed, model);
  // GPU-only: no '*' and no cpu entry in an expert string -> nothing on cpu.
  if (c.expert.find_first_not_of(' ') != std::string::npos &&
      c.expert.find('*') == std::string::npos && c.expert.find("cpu") == std::string::npos &&
      c.compute != "cpu") {
    for (const auto& d : plan.devices) {
      if (d.id.is_cpu()) {
        EXPECT_EQ(d.weight_bytes, 0u) << "GPU-only string placed units on cpu";
      }
    }
  }
  EXPECT_EQ(plan.expert_string.rfind(plan.compute_device.ToString() + ",", 0), 0u)
      << plan.expert_string;
}

// Keeps gtest from dumping the bytes of a Case.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class PlanCaseTest : public ::testing::TestWithParam<Case> {};

TEST_P(PlanCaseTest, Plans) {
  const Case& c = GetParam();
  auto devices = ParseDeviceTable(c.devices);
  ASSERT_TRUE(devices.ok()) << devices.status();
  std::vector<Unit> units = MakeModel(c.model);
  ASSERT_FALSE(units.empty()) << "unknown model spec " << c.model;
  Request r;
  r.compute_device = c.compute;
  r.virtual_vram_gb = c.vvram;
  r.donor_device = c.donor;
  r.expert_mode_allocations = c.expert;
  r.eject_models = c.eject;
  r.headroom.activation_bytes = c.activation;
  auto plan = MakePlan(*devices, units, r);
  if (c.error != StatusCode::kOk) {
    ASSERT_FALSE(plan.ok()) << "expected an error, got a plan:\n" << plan->ToText();
    EXPECT_EQ(plan.status().code(), c.error) << plan.status();
    for (const auto& s : c.error_has) {
      EXPECT_NE(plan.status().message().find(s), std::string::npos)
          << "'" << s << "' not in: " << plan.status().message();
    }
    return;
  }
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckInvariants(c, *plan, units, *devices);
  for (const auto& [id, bytes] : c.device_bytes) {
    const DevicePlan* d = plan->Device(*device::DeviceId::Parse(id));
    ASSERT_NE(d, nullptr) << id;
    EXPECT_EQ(d->weight_bytes, bytes) << id << "\n" << plan->ToText();
  }
  for (const auto& [unit, id] : c.unit_device) {
    const device::DeviceId* d = plan->DeviceOf(unit);
    ASSERT_NE(d, nullptr) << unit;
    EXPECT_EQ(d->ToString(), id) << unit << "\n" << plan->ToText();
  }
  if (c.expert_string) {
    EXPECT_EQ(plan->expert_string, *c.expert_string);
  }
  if (c.mode) {
    EXPECT_EQ(plan->mode, *c.mode) << ModeName(plan->mode);
  }
  if (c.deviations) {
    std::set<std::string> got;
    for (const auto& d : plan->deviations) got.insert(d.code);
    EXPECT_EQ(got, *c.deviations) << plan->ExplainText();
  }
  if (!c.warning.empty()) {
    bool found = false;
    for (const auto& w : plan->warnings) found |= w.find(c.warning) != std::string::npos;
    EXPECT_TRUE(found) << "no warning with '" << c.warning << "' in:\n" << plan->ToText();
  }
  if (!c.note.empty()) {
    bool found = false;
    for (const auto& n : plan->notes) found |= n.find(c.note) != std::string::npos;
    EXPECT_TRUE(found) << "no note with '" << c.note << "' in:\n" << plan->ToText();
  }
}

const char* k2 = "cuda:0=24gb,cpu=64gb";
const char* k3 = "cuda:0=24gb,cuda:1=24gb,cpu=64gb";
const char* kMixed = "cuda:0=24gb,cuda:1=8gb,cpu=64gb";
const char* k12 =
    "cuda:0=24gb,cuda:1=24gb,cuda:2=24gb,cuda:3=24gb,cuda:4=24gb,cuda:5=24gb,cuda:6=24gb,"
    "cuda:7=24gb,cuda:8=24gb,cuda:9=24gb,cuda:10=24gb,cuda:11=24gb,cpu=64gb";
const StatusCode kBad = StatusCode::kInvalidArgument;
const StatusCode kMissing = StatusCode::kNotFound;
const StatusCode kFull = StatusCode::kResourceExhausted;
using Devs = std::set<std::string>;

std::vector<Case> Cases() {
  std::vector<Case> cases = {
      // ---- virtual VRAM (1-3 donors) ----
      // docs/placement.md, "Virtual VRAM mode": the same v2 Expert String as DisTorch2's worked
      // example; its rounded cpu quota (0.0638 x 62.66 GiB < 4 GiB) would have left 3 units
      // fewer on cpu.
      {.name = "UpstreamEqualExpertString_VvramWorkedExample",
       .devices = "cuda:0=23.99gb,cpu=62.66gb",
       .model = "u:4874:1mb",
       .device_bytes = {{"cuda:0", 778 * kMiB}, {"cpu", 4 * kGiB}},
       .expert_string = "cuda:0,0.0317;cpu,0.0638",
       .deviations = Devs{"integer-quotas"},
       .mode = Mode::kVirtualVram},
      {.name = "UpstreamEqual_VvramOneGpuDonor",
       .devices = "cuda:0=24gb,cuda:1=32gb,cpu=64gb",
       .model = "u:24:1gb",
       .vvram = 8,
       .donor = "cuda:1",
       .device_bytes = {{"cuda:0", 16 * kGiB}, {"cuda:1", 8 * kGiB}, {"cpu", 0}},
       .unit_device = {{"blocks.7", "cuda:1"}, {"blocks.8", "cuda:0"}},
       .expert_string = "cuda:0,0.6667;cuda:1,0.2500",
       .deviations = Devs{}},
      {.name = "VvramTwoDonors_GpuDonorGivesCapacityNotTotal",
       .devices = "cuda:0=24gb,cuda:1=12gb,cpu=64gb",
       .model = "u:24:1gb",
       .vvram = 20,
       .donor = "cuda:1,cpu",
       // cuda:1 gives its capacity (12 GiB less the 768 MiB GPU reserve), not its total.
       .device_bytes = {{"cuda:0", 5 * kGiB}, {"cuda:1", 11 * kGiB}, {"cpu", 8 * kGiB}},
       .unit_device = {{"blocks.23", "cuda:0"},
                       {"blocks.20", "cuda:0"},
                       {"blocks.19", "cuda:1"},
                       {"blocks.9", "cuda:1"},
                       {"blocks.8", "cpu"},
                       {"blocks.1", "cpu"},
                       {"blocks.0", "cuda:0"}},
       .deviations = Devs{"donor-capacity"}},
      {.name = "VvramThreeDonors",
       .devices = "cuda:0=24gb,cuda:1=8gb,cuda:2=8gb,cpu=64gb",
       .model = "u:24:1gb",
       .vvram = 16,
       .donor = "cuda:1, cuda:2, cpu",
       .device_bytes =
           {{"cuda:0", 9 * kGiB}, {"cuda:1", 7 * kGiB}, {"cuda:2", 7 * kGiB}, {"cpu", 1 * kGiB}},
       .deviations = Devs{"donor-capacity", "integer-quotas"}},
      {.name = "VvramDonorIsCompute_CpuOnlyMachineDefaults",
       .devices = "cpu=64gb",
       .model = "u:8:1gb",
       .compute = "cpu",
       .device_bytes = {{"cpu", 8 * kGiB}},
       .warning = "cannot donate to itself",
       .mode = Mode::kComputeOnly},
      {.name = "VvramDonorsTooSmall_WarnsInsteadOfDropping",
       .devices = "cuda:0=24gb,cuda:1=4gb,cpu=64gb",
       .model = "u:12:1gb",
       .vvram = 10,
       .donor = "cuda:1",
       .device_bytes = {{"cuda:1", 3 * kGiB}, {"cuda:0", 9 * kGiB}},
       .warning = "can hold only"},
      {.name = "UpstreamEqual_VvramZeroNoExpert_ComputeOnly",
       .devices = k2,
       .model = "u:12:1gb",
       .vvram = 0,
       .eject = false,
       .device_bytes = {{"cuda:0", 12 * kGiB}, {"cpu", 0}},
       .deviations = Devs{},
       .mode = Mode::kComputeOnly},
      {.name = "VvramZero_ModelTooBig_SaysHowMuchVvram",
       .devices = k2,
       .model = "u:30:1gb",
       .vvram = 0,
       .error = kFull,
       .error_has = {"cuda:0 needs", "missing", "virtual_vram_gb"}},
      {.name = "VvramFluxDefaults_StemPinned",
       .devices = k2,
       .model = "flux",
       .unit_device = {{"img_in", "cuda:0"},
                       {"txt_in", "cuda:0"},
                       {"final_layer", "cuda:0"},
                       {"double_blocks.1", "cpu"}},
       .deviations = Devs{"pinned-units"}},
      {.name = "VvramWan_ActivationsOverflowCompute",
       .devices = k2,
       .model = "wan",
       .vvram = 10,
       .activation = 6 * kGiB,
       .error = kFull,
       .error_has = {"cuda:0 needs", "activations 6.00 GiB", "missing"}},
      {.name = "VvramWan_FitsWithMoreVvram_StemPinned",
       .devices = k2,
       .model = "wan",
       .vvram = 14,
       .activation = 6 * kGiB,
       .unit_device = {{"patch_embedding", "cuda:0"},
                       {"time_projection", "cuda:0"},
                       {"text_embedding", "cuda:0"},
                       {"blocks.1", "cpu"},
                       {"blocks.21", "cpu"},
                       {"blocks.22", "cuda:0"},
                       {"blocks.0", "cuda:0"},
                       {"head", "cuda:0"}}},
      {.name = "VvramNaN",
       .devices = k2,
       .model = "u:4:1gb",
       .vvram = std::nan(""),
       .error = kBad,
       .error_has = {"virtual_vram_gb nan"}},
      {.name = "VvramNegative",
       .devices = k2,
       .model = "u:4:1gb",
       .vvram = -1,
       .error = kBad,
       .error_has = {"virtual_vram_gb -1 is outside 0..128"}},
      {.name = "VvramAbove128",
       .devices = k2,
       .model = "u:4:1gb",
       .vvram = 128.5,
       .error = kBad,
       .error_has = {"outside 0..128"}},
      {.name = "VvramDonorNotInTable",
       .devices = k2,
       .model = "u:4:1gb",
       .donor = "cuda:3",
       .error = kMissing,
       .error_has = {"donor_device cuda:3 is not in the device table"}},
      {.name = "VvramDonorListEmptyEntry",
       .devices = k3,
       .model = "u:4:1gb",
       .donor = "cpu,,cuda:1",
       .error = kBad,
       .error_has = {"entry 2 at character 5 is empty"}},
      {.name = "VvramDonorListedTwice",
       .devices = k3,
       .model = "u:4:1gb",
       .donor = "cpu, CPU",
       .error = kBad,
       .error_has = {"cpu is listed twice"}},
      {.name = "VvramDonorMalformed",
       .devices = k3,
       .model = "u:4:1gb",
       .donor = "cuda:one",
       .error = kBad,
       .error_has = {"donor_device", "non-negative integer"}},
      {.name = "VvramTwelveGpus_ElevenDonors_NoOrderDeviation",
       .devices = k12,
       .model = "u:140:1gb",
       .vvram = 128,
       .donor = "cuda:1,cuda:2,cuda:3,cuda:4,cuda:5,cuda:6,cuda:7,cuda:8,cuda:9,cuda:10,cuda:11",
       // Capacities are 24 GiB less the 768 MiB GPU reserve: five donors give 23.25 GiB (23
       // whole units), cuda:6 the 11.75 GiB left of the 128 (11 units).
       .device_bytes = {{"cuda:0", 14 * kGiB},
                        {"cuda:1", 23 * kGiB},
                        {"cuda:5", 23 * kGiB},
                        {"cuda:6", 11 * kGiB},
                        {"cuda:7", 0},
                        {"cuda:11", 0},
                        {"cpu", 0}},
       .deviations = Devs{"donor-capacity"}},
      {.name = "VvramComputeOnSmallGpu_DonorSortsFirst_NumericOrder",
       .devices = kMixed,
       .model = "flux",
       .compute = "cuda:1",
       .vvram = 20,
       .donor = "cuda:0,cpu",
       .unit_device = {{"final_layer", "cuda:1"},
                       {"img_in", "cuda:1"},
                       {"double_blocks.1", "cuda:0"},
                       {"double_blocks.0", "cuda:1"}},
       .deviations = Devs{"numeric-order", "pinned-units"}},
      {.name = "VvramEjectFalse_Honoured",
       .devices = k2,
       .model = "u:8:1gb",
       .eject = false,
       .deviations = Devs{"eject-models"}},

      // ---- bytes ----
      {.name = "UpstreamEqual_BytesComputeQuotaCpuWildcard",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,6gb;cpu,*",
       .device_bytes = {{"cuda:0", 6 * kGiB}, {"cpu", 18 * kGiB}},
       .unit_device = {{"blocks.18", "cuda:0"}, {"blocks.17", "cpu"}},
       .expert_string = "cuda:0,0.2500;cpu,0.2812",
       .deviations = Devs{},
       .mode = Mode::kBytes},
      {.name = "BytesQuotaKeptExact_NotRoundedThroughFractions",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,8gb;cpu,*",
       .device_bytes = {{"cuda:0", 8 * kGiB}, {"cpu", 16 * kGiB}},
       .deviations = Devs{"integer-quotas"}},
      {.name = "BytesDecimal",
       .devices = k2,
       .model = "u:48:512mb",
       .expert = "cuda:0,1.5gb;cpu,*",
       .device_bytes = {{"cuda:0", 3 * 512 * kMiB}}},
      {.name = "BytesLeadingDot",
       .devices = k2,
       .model = "u:48:512mb",
       .expert = "cuda:0,.5gb;cpu,*",
       .device_bytes = {{"cuda:0", 512 * kMiB}}},
      {.name = "BytesTbIsTerabytes_OneTiBModel",
       .devices = "cuda:0=80gb,cpu=2tb",
       .model = "u:1024:1gb",
       .expert = "cuda:0,40gb;cpu,1tb",
       .device_bytes = {{"cuda:0", 40 * kGiB}, {"cpu", 984 * kGiB}},
       .deviations = Devs{"tb-terabytes"},
       .warning = "cpu takes the rest"},
      {.name = "UpstreamEqual_BytesCpuNamedIsDefaultWildcard",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,2gb",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}},
       .deviations = Devs{},
       .warning = "cpu takes the rest"},
      // The compute device is not in the string, so its share of the rest is 0: cuda:1 takes
      // the rest up to its capacity (21.6 GiB), the compute device what is left beyond that.
      {.name = "BytesGpuOnly_ComputeNotNamed_RestToTheNamedGpuUpToItsCapacity",
       .devices = k3,
       .model = "u:24:1gb",
       .expert = "cuda:1,12gb",
       .device_bytes = {{"cuda:0", 1 * kGiB}, {"cuda:1", 23 * kGiB}, {"cpu", 0}},
       .deviations = Devs{"gpu-only"},
       .note = "GPU-ONLY MODE: Distributed remaining 12288.00 MB across 2 GPUs (no CPU "
               "fallback)"},
      // The WAN 2.2 two-GPU guide's strings (a 33.6 GiB model in 0.4 GiB blocks): GPU-only,
      // "cuda:0,12gb;cuda:1,16gb", spreads the 5.6 GiB the quotas leave 3:4, so the GPUs hold
      // 14.4 and 19.2 GiB (43% / 57%, the guide's table); with ";cpu,*" the rest goes to cpu.
      {.name = "SeedGuideGpuOnly_12gb16gb_Is43And57Percent",
       .devices = k3,
       .model = "u:84:0.4gb",
       .expert = "cuda:0,12gb;cuda:1,16gb",
       .device_bytes = {{"cuda:0", 36 * 429496729ull}, {"cuda:1", 48 * 429496729ull}, {"cpu", 0}},
       .unit_device = {{"blocks.83", "cuda:0"}, {"blocks.48", "cuda:0"}, {"blocks.47", "cuda:1"}},
       .deviations = Devs{"gpu-only"},
       .note = "GPU-ONLY MODE: Distributed remaining 5734.40 MB across 2 GPUs (no CPU fallback)"},
      {.name = "SeedGuideCpuFallback_12gb16gbCpuWildcard",
       .devices = k3,
       .model = "u:84:0.4gb",
       .expert = "cuda:0,12gb;cuda:1,16gb;cpu,*",
       .device_bytes = {{"cuda:0", 30 * 429496729ull},
                        {"cuda:1", 40 * 429496729ull},
                        {"cpu", 14 * 429496729ull}},
       .deviations = Devs{},
       .note = "Assigning remaining 5734.40 MB of model to wildcard device 'cpu'"},
      // A second GPU with less room: its share of the rest is capped at its capacity (16.2
      // GiB), and the compute device takes the rest of the rest.
      {.name = "SeedGuideGpuOnly_SmallSecondGpu_ShareCappedAtCapacity",
       .devices = "cuda:0=24gb,cuda:1=18gb,cpu=64gb",
       .model = "u:84:0.4gb",
       .expert = "cuda:0,12gb;cuda:1,16gb",
       .device_bytes = {{"cuda:0", 41 * 429496729ull}, {"cuda:1", 43 * 429496729ull}, {"cpu", 0}},
       .deviations = Devs{"gpu-only"}},
      {.name = "SeedGuideGpuOnly_TooBig_SaysBytesMissingAndWhere",
       .devices = k3,
       .model = "u:50:1gb",
       .expert = "cuda:0,12gb;cuda:1,16gb",
       .error = kFull,
       .error_has = {"GPU-only mode", "the quotas leave 22.00 GiB",
                     "cuda:0 9.25 GiB more than its quota of 12.00 GiB",
                     "cuda:1 7.25 GiB more than its quota of 16.00 GiB",
                     "5.50 GiB (5905580032 bytes) missing", "cpu,*"}},
      // Fractions without cpu are GPU-only too (DisTorch2 left the rest on compute as orphans).
      {.name = "FractionGpuOnly_RestSpread",
       .devices = k3,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.25;cuda:1,0.25",
       .device_bytes = {{"cuda:0", 12 * kGiB}, {"cuda:1", 12 * kGiB}, {"cpu", 0}},
       .deviations = Devs{"gpu-only"}},
      {.name = "BytesGpuOnly_TooBig_SaysBytesMissing",
       .devices = k3,
       .model = "u:44:1gb",
       .expert = "cuda:0,22gb;cuda:1,22gb",
       .error = kFull,
       .error_has = {"cuda:0 needs 24.00 GiB", "but its capacity is 23.25 GiB",
                     "805306368 bytes) missing"}},
      {.name = "BytesGpuOnly_TwoGpusExact",
       .devices = k3,
       .model = "u:30:1gb",
       .expert = "cuda:0,15gb;cuda:1,15gb",
       .device_bytes = {{"cuda:0", 15 * kGiB}, {"cuda:1", 15 * kGiB}, {"cpu", 0}},
       .deviations = Devs{}},
      {.name = "WildcardOnly_GpuDonor",
       .devices = "cuda:0=24gb,cuda:1=48gb,cpu=64gb",
       .model = "flux",
       .expert = "cuda:1,*",
       .unit_device = {{"img_in", "cuda:0"},
                       {"double_blocks.0", "cuda:1"},
                       {"final_layer", "cuda:1"}},
       .deviations = Devs{"mode-by-token", "pinned-units"},
       .mode = Mode::kWildcardOnly},
      {.name = "WildcardOnly_Cpu",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cpu,*",
       .device_bytes = {{"cuda:0", 0}, {"cpu", 24 * kGiB}},
       .mode = Mode::kWildcardOnly},
      {.name = "UpstreamEqual_ZeroBytesThenWildcard",
       .devices = "cuda:0=24gb,cuda:1=48gb,cpu=64gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,0b;cuda:1,*",
       .device_bytes = {{"cuda:0", 0}, {"cuda:1", 24 * kGiB}},
       .deviations = Devs{}},
      {.name = "BytesAndFractionMixed_EachTokenByItself",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,0.5",
       .device_bytes = {{"cuda:0", 4 * kGiB}},
       .deviations = Devs{"mode-by-token"}},
      {.name = "BytesTwoWildcards_FillGpusInOrder",
       .devices = k3,
       .model = "u:40:1gb",
       .expert = "cuda:0,*;cuda:1,*",
       .device_bytes = {{"cuda:0", 21 * kGiB}, {"cuda:1", 19 * kGiB}, {"cpu", 0}}},
      {.name = "BytesComputeWildcard_OthersExplicit",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,*;cpu,10gb",
       .device_bytes = {{"cuda:0", 14 * kGiB}, {"cpu", 10 * kGiB}},
       .unit_device = {{"blocks.0", "cpu"}, {"blocks.23", "cuda:0"}}},
      {.name = "BytesMixedDevices_8gbAnd24gbAnd64gb",
       .devices = kMixed,
       .model = "flux",
       .expert = "cuda:0,12gb;cuda:1,6gb;cpu,*",
       .unit_device = {{"final_layer", "cuda:0"}, {"img_in", "cuda:0"}}},
      {.name = "BytesTwelveGpus_NumericOrder",
       .devices = k12,
       .model = "u:36:1gb",
       .expert = "cuda:10,10gb;cuda:2,10gb;cuda:0,*",
       .device_bytes = {{"cuda:0", 16 * kGiB}, {"cuda:2", 10 * kGiB}, {"cuda:10", 10 * kGiB}},
       .unit_device = {{"blocks.19", "cuda:2"}, {"blocks.10", "cuda:2"}, {"blocks.9", "cuda:10"}},
       .deviations = Devs{"numeric-order"}},
      {.name = "BytesFirstFitWouldFillGap_ContiguousHere",
       .devices = k2,
       .model = "firstfit",
       .expert = "cuda:0,2.5gb;cpu,*",
       .unit_device = {{"b3", "cuda:0"}, {"b2", "cpu"}, {"b1", "cpu"}, {"b0", "cpu"}},
       .deviations = Devs{"contiguous-ranges"}},
      {.name = "BytesExpertOverridesVvram_Warns",
       .devices = k2,
       .model = "u:24:1gb",
       .vvram = 6,
       .expert = "cuda:0,6gb;cpu,*",
       .warning = "virtual_vram_gb (6) is ignored"},
      {.name = "BytesEjectTrueWithoutVvram_Honoured",
       .devices = k2,
       .model = "u:24:1gb",
       .vvram = 0,
       .expert = "cuda:0,6gb;cpu,*",
       .deviations = Devs{"eject-models"}},
      {.name = "BytesComputeQuotaOverCapacity",
       .devices = k2,
       .model = "u:30:1gb",
       .expert = "cuda:0,23gb;cpu,*",
       .error = kFull,
       .error_has = {"cuda:0 needs", "move at least"}},
      {.name = "BytesDonorQuotaOverCapacity",
       .devices = "cuda:0=24gb,cuda:1=8gb,cpu=64gb",
       .model = "u:30:1gb",
       .expert = "cuda:1,20gb;cpu,*",
       .error = kFull,
       .error_has = {"cuda:1 needs 20.00 GiB", "capacity is 7.25 GiB"}},

      // ---- ratio ----
      {.name = "UpstreamEqual_Ratio",
       .devices = "cuda:0=24gb,cpu=72gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,25%;cpu,75%",
       .device_bytes = {{"cuda:0", 6 * kGiB}, {"cpu", 18 * kGiB}},
       .expert_string = "cuda:0,0.2500;cpu,0.2500",
       .deviations = Devs{},
       .mode = Mode::kRatio},
      {.name = "UpstreamEqual_RatioNormalised",
       .devices = "cuda:0=24gb,cpu=72gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,1%;cpu,3%",
       .device_bytes = {{"cuda:0", 6 * kGiB}, {"cpu", 18 * kGiB}},
       .deviations = Devs{}},
      {.name = "RatioWithWildcard_DocsExampleWorks",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,50%;cpu,*",
       .device_bytes = {{"cuda:0", 12 * kGiB}, {"cpu", 12 * kGiB}},
       .deviations = Devs{"mode-by-token"}},
      {.name = "RatioFourDevices",
       .devices = "cuda:0=24gb,cuda:1=24gb,cuda:2=24gb,cpu=64gb",
       .model = "u:40:1gb",
       .expert = "cuda:0,40%;cuda:1,20%;cuda:2,20%;cpu,20%",
       .device_bytes =
           {{"cuda:0", 16 * kGiB}, {"cuda:1", 8 * kGiB}, {"cuda:2", 8 * kGiB}, {"cpu", 8 * kGiB}}},
      {.name = "UpstreamReadme_Ratio8_8_4",
       .devices = k3,
       .model = "u:40:1gb",
       .expert = "cuda:0,8%;cuda:1,8%;cpu,4%",
       .device_bytes = {{"cuda:0", 16 * kGiB}, {"cuda:1", 16 * kGiB}, {"cpu", 8 * kGiB}},
       .deviations = Devs{}},
      {.name = "RatioDuplicateDevice",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,80%;cpu,30%;cuda:0,*",
       .error = kBad,
       .error_has = {"again"}},
      {.name = "RatioPercentagesOver100NextToWildcard",
       .devices = k3,
       .model = "u:24:1gb",
       .expert = "cuda:0,80%;cuda:1,30%;cpu,*",
       .error = kBad,
       .error_has = {"more than 100%"}},
      {.name = "RatioSumZero",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0%;cpu,0%",
       .error = kBad,
       .error_has = {"add up to 0%"}},
      {.name = "RatioWithoutDevice",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "50%",
       .error = kBad,
       .error_has = {"entry 1 '50%' at character 1 has no ','"}},
      {.name = "RatioNaN",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,nan%;cpu,*",
       .error = kBad,
       .error_has = {"entry 1 'cuda:0,nan%'", "invalid ratio"}},
      {.name = "RatioNegative",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,-5%;cpu,*",
       .error = kBad,
       .error_has = {"negative"}},
      {.name = "RatioExponent",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1e2%;cpu,*",
       .error = kBad,
       .error_has = {"invalid ratio"}},
      {.name = "RatioMixedWithFraction",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,25%;cpu,0.75",
       .error = kBad,
       .error_has = {"entry 2 'cpu,0.75' at character 12 is not a ratio"}},
      {.name = "RatioMixedWithBytes",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,25%;cpu,4gb",
       .error = kBad,
       .error_has = {"is not a ratio"}},

      // ---- fraction ----
      {.name = "UpstreamEqual_Fraction",
       .devices = "cuda:0=24gb,cpu=72gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,0.25;cpu,0.25",
       .device_bytes = {{"cuda:0", 6 * kGiB}, {"cpu", 18 * kGiB}},
       .deviations = Devs{},
       .mode = Mode::kFraction},
      {.name = "UpstreamEqual_FractionOrphansStayOnCompute",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.1;cpu,0.1",
       .device_bytes = {{"cuda:0", 18 * kGiB}, {"cpu", 6 * kGiB}},
       .deviations = Devs{},
       .warning = "orphans"},
      {.name = "UpstreamReadme_Fraction",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.1;cpu,0.5",
       .device_bytes = {{"cuda:0", 2 * kGiB}, {"cpu", 22 * kGiB}},
       .deviations = Devs{}},
      {.name = "UpstreamReadme_FractionThreeDevices",
       .devices = k3,
       .model = "u:96:64mb",
       .expert = "cuda:0,0.0207;cuda:1,0.1273;cpu,0.0808",
       .mode = Mode::kFraction},
      {.name = "FractionMpsName_NotBytes",
       .devices = "mps=32gb,cpu=64gb",
       .model = "u:24:1gb",
       .compute = "mps",
       .expert = "mps,0.5;cpu,0.5",
       .device_bytes = {{"mps", 16 * kGiB}, {"cpu", 8 * kGiB}},
       .deviations = Devs{"mode-by-token"},
       .mode = Mode::kFraction},
      {.name = "FractionWithWildcard",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.25;cpu,*",
       .device_bytes = {{"cuda:0", 6 * kGiB}},
       .deviations = Devs{"mode-by-token"}},
      {.name = "FractionLeadingDot",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,.25;cpu,*",
       .device_bytes = {{"cuda:0", 6 * kGiB}}},
      {.name = "FractionAboveOne",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1.5",
       .error = kBad,
       .error_has = {"fraction 1.5 is above 1", "write 1.5b"}},
      {.name = "FractionTwoCommas",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.5,1",
       .error = kBad,
       .error_has = {"more than one ','"}},
      {.name = "FractionEmptyValue",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,;cpu,*",
       .error = kBad,
       .error_has = {"entry 1 'cuda:0,' at character 1 has an empty value"}},
      {.name = "FractionExponent",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1e-1",
       .error = kBad,
       .error_has = {"unknown unit 'e-1'"}},
      {.name = "FractionInf",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,inf",
       .error = kBad,
       .error_has = {"invalid size 'inf'"}},
      {.name = "FractionNaN",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,nan",
       .error = kBad,
       .error_has = {"invalid size 'nan'"}},
      {.name = "FractionNegative",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,-0.5",
       .error = kBad,
       .error_has = {"negative"}},

      // ---- tokenisation and other malformed input (docs/placement.md, "Errors") ----
      {.name = "ExpertHashInside",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb#cuda:0",
       .error = kBad,
       .error_has = {"'#' at character 11"}},
      {.name = "ExpertHashPrefix_LegacyVramPart",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "#cuda:0",
       .error = kBad,
       .error_has = {"'#' at character 1"}},
      {.name = "ExpertSegmentWithoutComma",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu",
       .error = kBad,
       .error_has = {"entry 2 'cpu' at character 12 has no ','"}},
      {.name = "UpstreamEqual_ExpertTrailingSemicolons",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,6gb;;cpu,*;",
       .device_bytes = {{"cuda:0", 6 * kGiB}},
       .deviations = Devs{}},
      {.name = "ExpertDeviceWhitespaceAndCase",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = " CPU ,*;cuda:0,6gb",
       .device_bytes = {{"cuda:0", 6 * kGiB}},
       .deviations = Devs{"device-names"}},
      {.name = "ExpertUnknownDeviceType",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "gpu:0,4gb",
       .error = kBad,
       .error_has = {"unknown device type 'gpu'"}},
      {.name = "ExpertDeviceMissingIndex",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:,4gb",
       .error = kBad,
       .error_has = {"missing index"}},
      {.name = "ExpertDeviceNotInTable",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:7,4gb;cpu,*",
       .error = kMissing,
       .error_has = {"entry 1 'cuda:7,4gb' at character 1: cuda:7 is not in the device table"}},
      {.name = "ExpertTrailingGarbage",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb foo;cpu,*",
       .error = kBad,
       .error_has = {"unknown unit 'gb foo'"}},
      {.name = "ExpertNegativeBytes",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,-1gb;cpu,*",
       .error = kBad,
       .error_has = {"negative sizes"}},
      {.name = "ExpertNotANumber",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,abc",
       .error = kBad,
       .error_has = {"invalid size 'abc'"}},
      {.name = "ExpertExponentBytes",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1e3gb;cpu,*",
       .error = kBad,
       .error_has = {"unknown unit 'e3gb'"}},
      // DisTorch2 ignores a number next to '*' (its README's own example): so do we, warning.
      {.name = "UpstreamEqual_WildcardWithNumber",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,5gb*",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}},
       .deviations = Devs{},
       .warning = "entry 2 'cpu,5gb*' at character 12: '5gb*' makes cpu the wildcard (it takes "
                  "the rest of the model); the number 5gb is ignored",
       .note = "Assigning remaining 20480.00 MB of model to wildcard device 'cpu'"},
      {.name = "WildcardWithNumberBefore",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,*5gb",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}},
       .warning = "the number 5gb is ignored"},
      {.name = "UpstreamReadme_BytesWildcardWithNumber",
       .devices = k3,
       .model = "u:64:128mb",
       .expert = "cuda:0,500mb;cuda:1,3.0g;cpu,5gb*",
       .device_bytes = {{"cuda:0", 3 * 128 * kMiB}, {"cuda:1", 3 * kGiB}, {"cpu", 37 * 128 * kMiB}},
       .warning = "the number 5gb is ignored",
       .note = "Assigning remaining 4736.00 MB of model to wildcard device 'cpu'"},
      {.name = "ExpertWildcardStarInsideNumber",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,5*gb",
       .error = kBad,
       .error_has = {"entry 2 'cpu,5*gb' at character 12: a wildcard is '*'"}},
      {.name = "ExpertWildcardNextToGarbage",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,*abc",
       .error = kBad,
       .error_has = {"entry 2 'cpu,*abc' at character 12: the text next to '*' is not a value"}},
      {.name = "ExpertTwoStars",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cpu,**",
       .error = kBad,
       .error_has = {"entry 1 'cpu,**' at character 1: a wildcard is '*'"}},
      // A plain number above 1 cannot be a fraction: among byte values it is bytes, among
      // percentages a percentage, and alone an error (FractionAboveOne).
      {.name = "BareByteCountAmongBytes_IsBytes",
       .devices = k3,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cuda:1,2147483648;cpu,*",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cuda:1", 2 * kGiB}, {"cpu", 18 * kGiB}},
       .deviations = Devs{"integer-quotas"},  // DisTorch2 also reads bytes, then rounds
       .warning = "entry 2 'cuda:1,2147483648' at character 12: 2147483648 without a unit among "
                  "byte values is read as bytes (2.00 GiB; write 2147483648b to say so)"},
      {.name = "UpstreamEqual_BareByteCountCpuIsDefaultWildcard",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cpu,1073741824",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}},
       .warning = "read as bytes (1.00 GiB"},
      {.name = "BareNumberAtMostOneAmongBytesIsStillAFraction",
       .devices = k3,
       .model = "u:24:1gb",
       .expert = "cuda:0,4gb;cuda:1,1;cpu,*",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cuda:1", 20 * kGiB}, {"cpu", 0}},
       .deviations = Devs{"mode-by-token"}},
      {.name = "UpstreamEqual_BarePercentageAmongPercentages",
       .devices = "cuda:0=24gb,cpu=72gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,25%;cpu,75",
       .device_bytes = {{"cuda:0", 6 * kGiB}, {"cpu", 18 * kGiB}},
       .deviations = Devs{},
       .warning = "entry 2 'cpu,75' at character 12: 75 without '%' among percentages is read "
                  "as 75%"},
      {.name = "ExpertPlusSign",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,+4gb",
       .error = kBad,
       .error_has = {"sign"}},
      {.name = "ExpertHugeNumber",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,99999999tb",
       .error = kBad,
       .error_has = {"8 EiB"}},
      // A device named twice gets the sum of its values (DisTorch2 kept the last one).
      {.name = "ExpertDuplicateDevice_BytesAdded",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1gb;cpu,*;cuda:0,2gb",
       .device_bytes = {{"cuda:0", 3 * kGiB}, {"cpu", 21 * kGiB}},
       .deviations = Devs{"duplicate-devices"},
       .warning = "entry 3 'cuda:0,2gb' at character 18 names cuda:0 again (first in entry 1 "
                  "'cuda:0,1gb' at character 1); its values are added"},
      {.name = "ExpertDuplicateDeviceSpelledDifferently_BytesAdded",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1gb;CUDA:0,2gb;cpu,*",
       .device_bytes = {{"cuda:0", 3 * kGiB}, {"cpu", 21 * kGiB}},
       .deviations = Devs{"duplicate-devices", "device-names"}},
      {.name = "ExpertDuplicateDevice_FractionsAdded",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,0.25;cpu,*;cuda:0,0.25",
       .device_bytes = {{"cuda:0", 12 * kGiB}, {"cpu", 12 * kGiB}},
       .deviations = Devs{"duplicate-devices", "mode-by-token"}},
      {.name = "ExpertDuplicateDevice_RatiosAdded",
       .devices = "cuda:0=24gb,cpu=72gb",
       .model = "u:24:1gb",
       .expert = "cuda:0,25%;cpu,50%;cuda:0,25%",
       .device_bytes = {{"cuda:0", 12 * kGiB}, {"cpu", 12 * kGiB}},
       .deviations = Devs{"duplicate-devices"}},
      {.name = "ExpertDuplicateDevice_WildcardTwice",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cpu,*;cuda:0,4gb;cpu,*",
       .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}},
       .warning = "it is the wildcard once"},
      {.name = "ExpertDuplicateDevice_DifferentKinds",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = "cuda:0,1gb;cuda:0,0.1;cpu,*",
       .error = kBad,
       .error_has = {"entry 2 'cuda:0,0.1' at character 12 names cuda:0 again (first in entry 1 "
                     "'cuda:0,1gb' at character 1) with a fraction instead of bytes"}},
      {.name = "ExpertOnlySemicolons",
       .devices = k2,
       .model = "u:24:1gb",
       .expert = ";;",
       .error = kBad,
       .error_has = {"no device,value entry"}},
      {.name = "ExpertWhitespaceOnly_IsEmpty",
       .devices = k2,
       .model = "u:20:1gb",
       .expert = "   ",
       .device_bytes = {{"cpu", 4 * kGiB}},
       .deviations = Devs{"whitespace-expert"},
       .mode = Mode::kVirtualVram},

      // ---- compute device ----
      {.name = "ComputeNotInTable_CpuOnlyMachine",
       .devices = "cpu=64gb",
       .model = "u:4:1gb",
       .error = kMissing,
       .error_has = {"compute_device cuda:0 is not in the device table"}},
      {.name = "ComputeMalformed",
       .devices = k2,
       .model = "u:4:1gb",
       .compute = "cuda:x",
       .error = kBad,
       .error_has = {"compute_device", "cuda:x"}},

      // ---- text-encoder heads ----
      {.name = "UpstreamEqual_ClipHeadKeptOnCompute",
       .devices = k2,
       .model = "clip",
       .expert = "cpu,*",
       .unit_device = {{"text_model.embeddings", "cuda:0"},
                       {"text_model.encoder.layers.0", "cpu"},
                       {"text_model.final_layer_norm", "cpu"}},
       .deviations = Devs{"mode-by-token"}},
      {.name = "T5SharedKeptOnCompute",
       .devices = k2,
       .model = "t5",
       .expert = "cpu,*",
       .unit_device = {{"shared", "cuda:0"}, {"encoder.block.0", "cpu"}},
       .deviations = Devs{"mode-by-token", "pinned-units"}},
      {.name = "T5HeadCountsAgainstComputeQuota",
       .devices = k2,
       .model = "t5",
       .expert = "cuda:0,1gb;cpu,*",
       .device_bytes = {{"cuda:0", 768 * kMiB + 8 * kKiB}},
       .unit_device = {{"shared", "cuda:0"},
                       {"encoder.final_layer_norm", "cuda:0"},
                       {"encoder.block.23", "cuda:0"},
                       {"encoder.block.22", "cuda:0"},
                       {"encoder.block.21", "cpu"}}},
      {.name = "ClipVvram_HeadPinned",
       .devices = k2,
       .model = "clip",
       .vvram = 2,
       .unit_device = {{"text_model.embeddings", "cuda:0"},
                       {"text_model.encoder.layers.0", "cpu"}}},

      // ---- huge and tiny models ----
      {.name = "HugeOneTiB_VvramMaxStillTooBig",
       .devices = "cuda:0=80gb,cpu=2tb",
       .model = "u:1024:1gb",
       .vvram = 128,
       .error = kFull,
       .error_has = {"cuda:0 needs", "missing"}},
      {.name = "HugeOneTiB_CpuWildcard",
       .devices = "cuda:0=80gb,cpu=2tb",
       .model = "u:1024:1gb",
       .expert = "cuda:0,60gb;cpu,*",
       .device_bytes = {{"cuda:0", 60 * kGiB}, {"cpu", 964 * kGiB}}},
      {.name = "HugeOneTiB_TwelveGpus",
       .devices = k12,
       .model = "u:1024:1gb",
       .expert = "cuda:0,20gb;cuda:1,*",
       .error = kFull,
       .error_has = {"cuda:1 needs 1004.00 GiB"}},
      {.name = "TinyModel_AllOnDonor",
       .devices = k2,
       .model = "u:3:1kb",
       .device_bytes = {{"cuda:0", 0}, {"cpu", 3 * kKiB}},
       .expert_string = "cuda:0,0.0000;cpu,0.0000"},
      {.name = "TinyModel_ZeroByteUnits",
       .devices = k2,
       .model = "zero",
       .vvram = 0,
       .device_bytes = {{"cuda:0", 1 * kMiB}}},
  };
  // Every spelling of 4 GiB in the byte grammar.
  for (const char* spelling :
       {"4gb", "4 GB", "4gib", "4GiB", "4G", "4096mb", "4096 MiB", "4096m", "4194304kb", "4194304k",
        "4194304 KiB", "4294967296b", "0.00390625tb", "0.00390625 TiB", "  4gb  "}) {
    std::string name = std::string("BytesSpelling_") + spelling;
    for (char& ch : name) {
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') ch = '_';
    }
    cases.push_back({.name = name,
                     .devices = k2,
                     .model = "u:24:1gb",
                     .expert = std::string("cuda:0,") + spelling + ";cpu,*",
                     .device_bytes = {{"cuda:0", 4 * kGiB}, {"cpu", 20 * kGiB}}});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, PlanCaseTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

TEST(PlanCountTest, AtLeastEightyCases) { EXPECT_GE(Cases().size(), 80u); }

// Inputs that are not strings: the device table and the unit list.
TEST(MakePlanTest, RejectsBadTablesAndUnits) {
  auto devices = *ParseDeviceTable(k2);
  std::vector<Unit> units = MakeModel("u:4:1gb");
  Request r;
  auto expect = [](const StatusOr<Plan>& p, std::string_view has) {
    ASSERT_FALSE(p.ok());
    EXPECT_NE(p.status().message().find(has), std::string::npos) << p.status();
  };
  expect(MakePlan({}, units, r), "device table is empty");
  auto dup = devices;
  dup.push_back(devices[0]);
  expect(MakePlan(dup, units, r), "cuda:0 appears twice");
  auto over = devices;
  over[0].capacity_bytes = over[0].total_bytes + 1;
  expect(MakePlan(over, units, r), "is above its total");
  expect(MakePlan(devices, {}, r), "no placement units");
  auto twice = units;
  twice[2].name = "blocks.0";
  expect(MakePlan(devices, twice, r), "unit 'blocks.0' appears twice (units 0 and 2)");
  auto unnamed = units;
  unnamed[1].name = "";
  expect(MakePlan(devices, unnamed, r), "unit 1 has an empty name");
  auto huge = units;
  huge[0].bytes = 1ull << 63;
  expect(MakePlan(devices, huge, r), "larger than 4 EiB");
  Request depth;
  depth.headroom.prefetch_depth = -1;
  expect(MakePlan(devices, units, depth), "prefetch depth -1");
  Request reserve;
  reserve.headroom.reserve_bytes = 30 * kGiB;
  expect(MakePlan(devices, units, reserve), "reserve 30.00 GiB");
}

TEST(MakePlanTest, HeadroomIsPrefetchDepthTimesLargestStreamedUnit) {
  auto devices = *ParseDeviceTable(k2);
  std::vector<Unit> units = MakeModel("u:8:1gb");
  units[0].bytes = 3 * kGiB;  // streamed from cpu
  Request r;
  r.headroom = {3, 100 * kMiB, 50 * kMiB};
  auto plan = MakePlan(devices, units, r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->prefetch_bytes, 9 * kGiB);
  EXPECT_EQ(plan->Device(device::DeviceId::Cuda(0))->headroom_bytes, 9 * kGiB + 150 * kMiB);
  EXPECT_EQ(plan->Device(device::DeviceId::Cpu())->headroom_bytes, 0u);
}

// The WAN 2.2 two-GPU guide's table for its GPU-only string: 43% / 57% of the model, as the
// plan text shows it.
TEST(SeedGuideTest, GpuOnly12gb16gbPutsFortyThreeAndFiftySevenPercentOnTheGpus) {
  auto devices = *ParseDeviceTable(k3);
  Request r;
  r.expert_mode_allocations = "cuda:0,12gb;cuda:1,16gb";
  auto plan = MakePlan(devices, MakeModel("u:84:0.4gb"), r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto percent = [&](const device::DeviceId& id) {
    return std::lround(100.0 * static_cast<double>(plan->Device(id)->weight_bytes) /
                       static_cast<double>(plan->model_bytes));
  };
  EXPECT_EQ(percent(device::DeviceId::Cuda(0)), 43);
  EXPECT_EQ(percent(device::DeviceId::Cuda(1)), 57);
  EXPECT_EQ(plan->Device(device::DeviceId::Cpu())->weight_bytes, 0u);
  std::string text = plan->ToText();
  EXPECT_NE(text.find("42.9%"), std::string::npos) << text;
  EXPECT_NE(text.find("57.1%"), std::string::npos) << text;
  EXPECT_NE(text.find("GPU-ONLY MODE: Distributed remaining 5734.40 MB across 2 GPUs (no CPU "
                      "fallback)"),
            std::string::npos)
      << text;
  EXPECT_NE(plan->ToJson().find("\"notes\": [\n    \"GPU-ONLY MODE"), std::string::npos)
      << plan->ToJson();
}

TEST(MakePlanTest, IsDeterministic) {
  auto devices = *ParseDeviceTable(kMixed);
  Request r;
  r.expert_mode_allocations = "cuda:0,12gb;cuda:1,6gb;cpu,*";
  auto a = MakePlan(devices, MakeModel("flux"), r);
  auto b = MakePlan(devices, MakeModel("flux"), r);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->ToJson(), b->ToJson());
}

}  // namespace
}  // namespace fleet::placement
