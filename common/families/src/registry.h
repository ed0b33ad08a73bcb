// The registered families (one function per family file). To add a family, add its file and
// one line to AllFamilies() in registry.cc; docs/models.md walks through it.
#pragma once

#include "fleet/families/family.h"

namespace fleet::families::internal {

const Family& FluxFamily();
const Family& WanFamily();
const Family& LinearFamily();
const Family& TextEncoderFamily();

}  // namespace fleet::families::internal
