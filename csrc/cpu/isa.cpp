// Run-time ISA probe (isa.h): cpuid leaves 1 and 7, XGETBV for the register state the OS saves, and on Linux the
// AMX tile-data permission request.
#include "cpu/isa.h"

#include <cpuid.h>
#include <torch/all.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace slf::cpu {
namespace {

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (__get_cpuid_max(0, nullptr) < leaf) return r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

unsigned long long xcr0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }

// Linux hands out the AMX tile-data state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool request_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Isa probe() {
  const Regs l1 = cpuid(1, 0);
  const bool osxsave = bit(l1.c, 27);
  if (!osxsave) return Isa::kScalar;
  const unsigned long long xcr = xcr0();
  const bool ymm_state = (xcr & 0x6) == 0x6;     // SSE + AVX state
  const bool zmm_state = (xcr & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (xcr & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  const Regs l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
  const bool avx2 = ymm_state && bit(l1.c, 12) /*fma*/ && bit(l1.c, 29) /*f16c*/ && bit(l7.b, 5) /*avx2*/;
  if (!avx2) return Isa::kScalar;
  const bool avx512 = zmm_state && bit(l7.b, 16) /*f*/ && bit(l7.b, 17) /*dq*/ && bit(l7.b, 30) /*bw*/ &&
                      bit(l7.b, 31) /*vl*/;
  const bool bf16 = avx512 && bit(l7s1.a, 5) /*avx512_bf16*/;
  if (!bf16) return Isa::kAvx2;
  const bool amx = tile_state && bit(l7.d, 24) /*amx-tile*/ && bit(l7.d, 22) /*amx-bf16*/;
  return amx && request_amx() ? Isa::kAmx : Isa::kAvx512Bf16;
}

Isa from_env(Isa detected) {
  const char* s = std::getenv("STABLELM_FAST_ISA");
  Isa want = detected;
  if (s != nullptr && *s != '\0') {
    const std::string v(s);
    if (v == "scalar") want = Isa::kScalar;
    else if (v == "avx2") want = Isa::kAvx2;
    else if (v == "avx512bf16") want = Isa::kAvx512Bf16;
    else if (v == "amx") want = Isa::kAmx;
    else TORCH_CHECK(false, "STABLELM_FAST_ISA must be one of amx, avx512bf16, avx2, scalar; got '", v, "'");
  }
  const char* no_avx2 = std::getenv("STABLELM_FAST_NO_AVX2");
  if (no_avx2 != nullptr && *no_avx2 != '\0') want = Isa::kScalar;
  return static_cast<int>(want) < static_cast<int>(detected) ? want : detected;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = probe();
  return isa;
}

Isa cpu_isa() {
  static const Isa isa = from_env(detected_isa());
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace slf::cpu
