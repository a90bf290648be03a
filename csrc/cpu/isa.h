// The CPU instruction set the kernels run with: probed once per process (cpuid + the OS's saved register state),
// capped by STABLELM_FAST_ISA, and read by every kernel and by pack_linear_weight (csrc/cpu/isa.cpp).
#pragma once

namespace slf::cpu {

// Ordered: each level implies the ones below it.
enum class Isa : int {
  kScalar = 0,      // portable C++ (no SIMD intrinsics)
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512Bf16 = 2,  // AVX-512 F/BW/VL/DQ + AVX512_BF16 (vdpbf16ps)
  kAmx = 3,         // kAvx512Bf16 + AMX-TILE / AMX-BF16, granted by the kernel (arch_prctl)
};

// The ISA of this process: the best the CPU and OS support, lowered by STABLELM_FAST_ISA=amx|avx512bf16|avx2|scalar
// (never raised: asking for more than the CPU has keeps what it has). STABLELM_FAST_NO_AVX2=1 (older name) is
// STABLELM_FAST_ISA=scalar. An unknown STABLELM_FAST_ISA value is an error at the first kernel call.
Isa cpu_isa();

// What the CPU and OS support, ignoring the environment.
Isa detected_isa();

const char* isa_name(Isa isa);

}  // namespace slf::cpu
