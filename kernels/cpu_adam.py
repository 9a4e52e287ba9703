"""Quantized Adam on CPU in one pass: dequantize -> Adam -> requantize, block by block, as a small C++ function.

The pure-torch path (lowmem.optim.state.storage + lowmem.optim.parts.cores.adam_math) runs a dozen full-tensor passes per moment
(decode, scale, the Adam math, absmax, normalize, encode, pack); this kernel keeps one quantization block (256
int8 or 128 int4 elements) in registers and the L1 cache and touches each code, scale, gradient and weight
once. It computes what the pure-torch path computes, operation by operation in the same fp32 rounding (fused
multiply-adds where torch's CPU kernels fuse them: `add` with alpha, `addcmul`), so its codes and scales match
that path bit for bit; directions and weights match to float rounding (its square root is correctly rounded,
torch's CPU one not always). Whole blocks run in AVX-512 where the compiler targets it, the rest in plain loops.

    adam_direction  moments updated in place, the bias-corrected direction D returned (a projected core)
    adam_update     moments updated in place and the fp32 weight stepped, W -= lr D with decoupled decay before
                    or after (the pipeline's Adam conventions)

Built on first use with the system C++ compiler (`CXX`, else g++ / c++: the same one torch.compile's CPU
backend needs) into a cache directory (`LOWMEM_KERNEL_CACHE`, else ~/.cache/lowmem/kernels), keyed by the
source, the flags and the CPU's feature flags; a build takes about two seconds and is reused by every later
process. It is loaded with ctypes and parallelized with OpenMP over blocks, in the same OpenMP runtime torch
uses (`torch.get_num_threads()` threads). Where no compiler is found or the build fails, `available()` is
False (a warning says why, once) and the optimizer keeps the pure-torch path. Not covered, so also left to
that path: the rank-1 normalized int4 second moment, gradients other than fp32, non-contiguous weights, devices
other than the CPU. Like every kernel it takes tensors and numbers: the Adam core
(lowmem.optim.parts.cores) passes its stored moments and the state maps' tables in.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lowmem.kernels.constants import SCALE_FLOOR


DIRECTION, DECAY_BEFORE, DECAY_AFTER = 0, 1, 2

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace {

constexpr float FLOOR = %(floor)s;

inline float floored(float s) { return s < FLOOR ? FLOOR : s; }  // torch's clamp(min=): NaN stays NaN
inline float clamp1(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }
inline uint32_t bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float float_of(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// quantization.QuantMap._encode_by_prefix: the top 16 bits of x in an order-preserving form select an
// interval; the code is the number of map midpoints below the interval plus one comparison with the midpoint
// inside it, made on the low 16 bits of the same form (x and that midpoint share the top ones). One table
// entry per interval: count << 16 | the midpoint's low 16 bits (0xFFFF where none, which nothing exceeds).
inline int32_t encode(float x, const int32_t* __restrict table) {
    const int32_t bits = (int32_t)bits_of(x);
    const int32_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF);
    const int32_t entry = table[(ordered >> 16) + 32768];
    return (entry >> 16) + ((ordered & 0xFFFF) > (entry & 0xFFFF) ? 1 : 0);
}

struct Tables {
    const float* m_values; const float* v_values;
    const int32_t* m_encode; const int32_t* v_encode;
};

struct Scalars {
    float beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, neg_lr, keep;
};

// One block of `len` (<= BLOCK) elements: the moments decoded with the block's scales, updated by the gradient
// (exp_avg.mul_(beta1).add_(grad, alpha=1-beta1), exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2):
// torch's CPU kernels fuse both multiply-adds), the direction written or the weight stepped, the moments
// encoded with their new absmax. |x| compares as its bit pattern (a NaN above every number, as torch's amax).
template <int BITS, int BLOCK, int WRITE, bool EPS_SCALED>
inline void block_step(int len, const float* __restrict g, float* __restrict w, float* __restrict out,
                       uint8_t* __restrict mc, uint8_t* __restrict vc, float* __restrict ma,
                       float* __restrict va, const Tables& t, const Scalars& s) {
    float m[BLOCK], v[BLOCK];
    const float sm = floored(*ma), sv = floored(*va);
    const float* __restrict mvals = t.m_values;
    const float* __restrict vvals = t.v_values;
    if (BITS == 8) {
        #pragma omp simd
        for (int i = 0; i < len; ++i) {
            m[i] = std::fma(g[i], s.omb1, (mvals[mc[i]] * sm) * s.beta1);
            v[i] = std::fma(s.omb2 * g[i], g[i], (vvals[vc[i]] * sv) * s.beta2);
        }
    } else {
        const int pairs = (len + 1) / 2;
        #pragma omp simd
        for (int j = 0; j < pairs; ++j) {
            const int mb = mc[j], vb = vc[j];
            m[2 * j] = (mvals[mb & 15] * sm);
            m[2 * j + 1] = (mvals[mb >> 4] * sm);
            v[2 * j] = (vvals[vb & 15] * sv);
            v[2 * j + 1] = (vvals[vb >> 4] * sv);
        }
        #pragma omp simd
        for (int i = 0; i < len; ++i) {
            m[i] = std::fma(g[i], s.omb1, m[i] * s.beta1);
            v[i] = std::fma(s.omb2 * g[i], g[i], v[i] * s.beta2);
        }
    }
    uint32_t am = 0, av = 0;
    #pragma omp simd reduction(max: am, av)
    for (int i = 0; i < len; ++i) {
        const uint32_t a = bits_of(m[i]) & 0x7FFFFFFFu, b = bits_of(v[i]) & 0x7FFFFFFFu;
        am = a > am ? a : am;
        av = b > av ? b : av;
    }
    #pragma omp simd
    for (int i = 0; i < len; ++i) {
        float d;
        if (EPS_SCALED) {
            d = (m[i] / (std::sqrt(v[i]) / s.bias2_sqrt + s.eps)) / s.bias1;
        } else {
            d = (m[i] / (std::sqrt(v[i]) + s.eps)) * s.corr;
        }
        if (WRITE == 0) {
            out[i] = d;
        } else if (WRITE == 1) {
            w[i] = std::fma(d, s.neg_lr, w[i] * s.keep);
        } else {
            w[i] = std::fma(d, s.neg_lr, w[i]) * s.keep;
        }
    }
    const float amf = float_of(am), avf = float_of(av);
    const float im = 1.0f / floored(amf), iv = 1.0f / floored(avf);
    int32_t mcode[BLOCK], vcode[BLOCK];
    #pragma omp simd
    for (int i = 0; i < len; ++i) {
        mcode[i] = encode(clamp1(m[i] * im), t.m_encode);
        vcode[i] = encode(clamp1(v[i] * iv), t.v_encode);
    }
    if (BITS == 8) {
        #pragma omp simd
        for (int i = 0; i < len; ++i) {
            mc[i] = (uint8_t)mcode[i];
            vc[i] = (uint8_t)vcode[i];
        }
    } else {
        // two codes per byte, element 2i in the low nibble; an odd tail's high nibble is 0
        if (len & 1) { mcode[len] = 0; vcode[len] = 0; }
        const int pairs = (len + 1) / 2;
        #pragma omp simd
        for (int j = 0; j < pairs; ++j) {
            mc[j] = (uint8_t)(mcode[2 * j] | (mcode[2 * j + 1] << 4));
            vc[j] = (uint8_t)(vcode[2 * j] | (vcode[2 * j + 1] << 4));
        }
    }
    *ma = amf;
    *va = avf;
}


#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same steps on whole blocks, 16 lanes at a time (the loops above do not vectorize their table lookups).
struct Lanes {
    __m512 beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, neg_lr, keep, one, minus_one;
    __m512i abs_mask, low16, sign_fix, half;
    explicit Lanes(const Scalars& s)
        : beta1(_mm512_set1_ps(s.beta1)), omb1(_mm512_set1_ps(s.omb1)), beta2(_mm512_set1_ps(s.beta2)),
          omb2(_mm512_set1_ps(s.omb2)), eps(_mm512_set1_ps(s.eps)), bias1(_mm512_set1_ps(s.bias1)),
          bias2_sqrt(_mm512_set1_ps(s.bias2_sqrt)), corr(_mm512_set1_ps(s.corr)), neg_lr(_mm512_set1_ps(s.neg_lr)),
          keep(_mm512_set1_ps(s.keep)), one(_mm512_set1_ps(1.0f)), minus_one(_mm512_set1_ps(-1.0f)),
          abs_mask(_mm512_set1_epi32(0x7FFFFFFF)), low16(_mm512_set1_epi32(0xFFFF)),
          sign_fix(_mm512_set1_epi32(0x7FFFFFFF)), half(_mm512_set1_epi32(32768)) {}
};

template <bool EPS_SCALED>
inline __m512 direction16(__m512 m, __m512 v, const Lanes& l) {
    if (EPS_SCALED) {
        return _mm512_div_ps(_mm512_div_ps(m, _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), l.bias2_sqrt), l.eps)),
                             l.bias1);
    }
    return _mm512_mul_ps(_mm512_div_ps(m, _mm512_add_ps(_mm512_sqrt_ps(v), l.eps)), l.corr);
}

template <int WRITE>
inline __m512 stepped16(__m512 w, __m512 d, const Lanes& l) {
    if (WRITE == 1) return _mm512_fmadd_ps(d, l.neg_lr, _mm512_mul_ps(w, l.keep));
    return _mm512_mul_ps(_mm512_fmadd_ps(d, l.neg_lr, w), l.keep);
}

// clamp to [-1, 1] with a NaN passed through (vmaxps / vminps return their second operand on NaN), then encode
inline __m512i encode16(__m512 x, __m512 inv, const int32_t* table, const Lanes& l) {
    x = _mm512_min_ps(l.one, _mm512_max_ps(l.minus_one, _mm512_mul_ps(x, inv)));
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i ordered = _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), l.sign_fix));
    const __m512i entry = _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_srai_epi32(ordered, 16), l.half), table, 4);
    const __mmask16 above = _mm512_cmpgt_epi32_mask(_mm512_and_si512(ordered, l.low16), _mm512_and_si512(entry, l.low16));
    const __m512i code = _mm512_srai_epi32(entry, 16);
    return _mm512_mask_add_epi32(code, above, code, _mm512_set1_epi32(1));
}

inline __m512i abs_bits(__m512 x, const Lanes& l) { return _mm512_and_si512(_mm512_castps_si512(x), l.abs_mask); }

inline float inverse_scale(__m512i amax, float* stored) {
    const float a = float_of((uint32_t)_mm512_reduce_max_epu32(amax));
    *stored = a;
    return 1.0f / floored(a);
}

template <int WRITE, bool EPS_SCALED>
inline void block8(const float* __restrict g, float* __restrict w, float* __restrict out, uint8_t* __restrict mc,
                   uint8_t* __restrict vc, float* __restrict ma, float* __restrict va, const Tables& t,
                   const Lanes& l) {
    alignas(64) float m[256], v[256];
    const __m512 sm = _mm512_set1_ps(floored(*ma)), sv = _mm512_set1_ps(floored(*va));
    __m512i am = _mm512_setzero_si512(), av = _mm512_setzero_si512();
    for (int i = 0; i < 256; i += 16) {
        const __m512i mi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mc + i)));
        const __m512i vi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(vc + i)));
        const __m512 gg = _mm512_loadu_ps(g + i);
        const __m512 mm = _mm512_fmadd_ps(gg, l.omb1, _mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(mi, t.m_values, 4), sm), l.beta1));
        const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(l.omb2, gg), gg,
                                          _mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(vi, t.v_values, 4), sv), l.beta2));
        _mm512_store_ps(m + i, mm);
        _mm512_store_ps(v + i, vv);
        am = _mm512_max_epu32(am, abs_bits(mm, l));
        av = _mm512_max_epu32(av, abs_bits(vv, l));
        const __m512 d = direction16<EPS_SCALED>(mm, vv, l);
        if (WRITE == 0) _mm512_storeu_ps(out + i, d);
        else _mm512_storeu_ps(w + i, stepped16<WRITE>(_mm512_loadu_ps(w + i), d, l));
    }
    const __m512 im = _mm512_set1_ps(inverse_scale(am, ma)), iv = _mm512_set1_ps(inverse_scale(av, va));
    for (int i = 0; i < 256; i += 16) {
        _mm_storeu_si128((__m128i*)(mc + i), _mm512_cvtepi32_epi8(encode16(_mm512_load_ps(m + i), im, t.m_encode, l)));
        _mm_storeu_si128((__m128i*)(vc + i), _mm512_cvtepi32_epi8(encode16(_mm512_load_ps(v + i), iv, t.v_encode, l)));
    }
}

// int4: 16 bytes hold elements 2j (low nibble) and 2j+1 (high nibble) of 32 consecutive ones; the math runs on
// the even and the odd elements as two vectors, the weights and directions are split and interleaved around it.
template <int WRITE, bool EPS_SCALED>
inline void block4(const float* __restrict g, float* __restrict w, float* __restrict out, uint8_t* __restrict mc,
                   uint8_t* __restrict vc, float* __restrict ma, float* __restrict va, const Tables& t,
                   const Lanes& l) {
    alignas(64) float m[128], v[128];  // per 32 elements: 16 even, then 16 odd
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i nibble = _mm512_set1_epi32(15);
    const __m512 mtab = _mm512_loadu_ps(t.m_values), vtab = _mm512_loadu_ps(t.v_values);
    const __m512 sm = _mm512_set1_ps(floored(*ma)), sv = _mm512_set1_ps(floored(*va));
    __m512i am = _mm512_setzero_si512(), av = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
        const __m512i mb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mc + 16 * j)));
        const __m512i vb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(vc + 16 * j)));
        const float* gj = g + 32 * j;
        const __m512 g0 = _mm512_loadu_ps(gj), g1 = _mm512_loadu_ps(gj + 16);
        __m512 d[2];
        for (int h = 0; h < 2; ++h) {
            const __m512 gg = _mm512_permutex2var_ps(g0, h ? odd : even, g1);
            const __m512i mcode = h ? _mm512_srli_epi32(mb, 4) : _mm512_and_si512(mb, nibble);
            const __m512i vcode = h ? _mm512_srli_epi32(vb, 4) : _mm512_and_si512(vb, nibble);
            const __m512 mm = _mm512_fmadd_ps(gg, l.omb1, _mm512_mul_ps(_mm512_mul_ps(_mm512_permutexvar_ps(mcode, mtab), sm), l.beta1));
            const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(l.omb2, gg), gg,
                                              _mm512_mul_ps(_mm512_mul_ps(_mm512_permutexvar_ps(vcode, vtab), sv), l.beta2));
            _mm512_store_ps(m + 32 * j + 16 * h, mm);
            _mm512_store_ps(v + 32 * j + 16 * h, vv);
            am = _mm512_max_epu32(am, abs_bits(mm, l));
            av = _mm512_max_epu32(av, abs_bits(vv, l));
            d[h] = direction16<EPS_SCALED>(mm, vv, l);
        }
        if (WRITE == 0) {
            _mm512_storeu_ps(out + 32 * j, _mm512_permutex2var_ps(d[0], first, d[1]));
            _mm512_storeu_ps(out + 32 * j + 16, _mm512_permutex2var_ps(d[0], second, d[1]));
        } else {
            float* wj = w + 32 * j;
            const __m512 w0 = _mm512_loadu_ps(wj), w1 = _mm512_loadu_ps(wj + 16);
            const __m512 we = stepped16<WRITE>(_mm512_permutex2var_ps(w0, even, w1), d[0], l);
            const __m512 wo = stepped16<WRITE>(_mm512_permutex2var_ps(w0, odd, w1), d[1], l);
            _mm512_storeu_ps(wj, _mm512_permutex2var_ps(we, first, wo));
            _mm512_storeu_ps(wj + 16, _mm512_permutex2var_ps(we, second, wo));
        }
    }
    const __m512 im = _mm512_set1_ps(inverse_scale(am, ma)), iv = _mm512_set1_ps(inverse_scale(av, va));
    for (int j = 0; j < 4; ++j) {
        const __m512i mlo = encode16(_mm512_load_ps(m + 32 * j), im, t.m_encode, l);
        const __m512i mhi = encode16(_mm512_load_ps(m + 32 * j + 16), im, t.m_encode, l);
        const __m512i vlo = encode16(_mm512_load_ps(v + 32 * j), iv, t.v_encode, l);
        const __m512i vhi = encode16(_mm512_load_ps(v + 32 * j + 16), iv, t.v_encode, l);
        _mm_storeu_si128((__m128i*)(mc + 16 * j), _mm512_cvtepi32_epi8(_mm512_or_si512(mlo, _mm512_slli_epi32(mhi, 4))));
        _mm_storeu_si128((__m128i*)(vc + 16 * j), _mm512_cvtepi32_epi8(_mm512_or_si512(vlo, _mm512_slli_epi32(vhi, 4))));
    }
}
#define LOWMEM_AVX512 1
#endif

template <int BITS, int BLOCK, int WRITE, bool EPS_SCALED>
void run(int64_t numel, int threads, const float* g, float* w, float* out, uint8_t* mc, uint8_t* vc, float* ma,
         float* va, const Tables& t, const Scalars& s) {
    const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
    const int64_t code_block = BITS == 8 ? BLOCK : BLOCK / 2;
#ifdef LOWMEM_AVX512
    const Lanes lanes(s);
#endif
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK;
        const int len = (int)(numel - start < BLOCK ? numel - start : BLOCK);
#ifdef LOWMEM_AVX512
        if (len == BLOCK) {
            if (BITS == 8) {
                block8<WRITE, EPS_SCALED>(g + start, w + start, out + start, mc + b * code_block, vc + b * code_block,
                                          ma + b, va + b, t, lanes);
            } else {
                block4<WRITE, EPS_SCALED>(g + start, w + start, out + start, mc + b * code_block, vc + b * code_block,
                                          ma + b, va + b, t, lanes);
            }
            continue;
        }
#endif
        block_step<BITS, BLOCK, WRITE, EPS_SCALED>(
            len, g + start, WRITE == 0 ? nullptr : w + start, WRITE == 0 ? out + start : nullptr,
            mc + b * code_block, vc + b * code_block, ma + b, va + b, t, s);
    }
}

template <int BITS, int BLOCK>
void dispatch(int write, int eps_scaled, int64_t numel, int threads, const float* g, float* w, float* out,
              uint8_t* mc, uint8_t* vc, float* ma, float* va, const Tables& t, const Scalars& s) {
    if (eps_scaled) {
        if (write == 0) run<BITS, BLOCK, 0, true>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
        else if (write == 1) run<BITS, BLOCK, 1, true>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
        else run<BITS, BLOCK, 2, true>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
    } else {
        if (write == 0) run<BITS, BLOCK, 0, false>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
        else if (write == 1) run<BITS, BLOCK, 1, false>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
        else run<BITS, BLOCK, 2, false>(numel, threads, g, w, out, mc, vc, ma, va, t, s);
    }
}

}  // namespace

extern "C" int lowmem_quantized_adam(
        int bits, int64_t numel, int threads,
        const float* grad, float* weight, float* out,
        uint8_t* m_codes, uint8_t* v_codes, float* m_absmax, float* v_absmax,
        const float* m_values, const float* v_values,
        const int32_t* m_encode, const int32_t* v_encode,
        float beta1, float omb1, float beta2, float omb2, float eps, float bias1, float bias2_sqrt, float corr,
        float neg_lr, float keep, int eps_scaled, int write) {
    const Tables t{m_values, v_values, m_encode, v_encode};
    const Scalars s{beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, neg_lr, keep};
    if (bits == 8) {
        dispatch<8, 256>(write, eps_scaled, numel, threads, grad, weight, out, m_codes, v_codes, m_absmax, v_absmax, t, s);
        return 0;
    }
    if (bits == 4) {
        dispatch<4, 128>(write, eps_scaled, numel, threads, grad, weight, out, m_codes, v_codes, m_absmax, v_absmax, t, s);
        return 0;
    }
    return 1;
}
""" % {"floor": repr(float(SCALE_FLOOR)) + "f"}

# -ffp-contract=off: only the fused multiply-adds written out above, as torch's kernels round
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LOWMEM_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowmem" / "kernels"


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    digest = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_flags(), platform.machine()]).encode())
    target = _cache_dir() / f"quantized_adam_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            source = Path(work) / "quantized_adam.cpp"
            source.write_text(SOURCE)
            built = Path(work) / target.name
            result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)  # atomic: a concurrent build of the same source writes the same file
    library = ctypes.CDLL(str(target))
    function = library.lowmem_quantized_adam
    function.restype = ctypes.c_int
    function.argtypes = ([ctypes.c_int, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 11
                         + [ctypes.c_float] * 10 + [ctypes.c_int, ctypes.c_int])
    return library


def available() -> bool:
    """Whether the kernel is built (building it on the first call); False, with one warning, where it cannot be."""
    global _library, _failed
    if _library is not None:
        return True
    if _failed is not None:
        return False
    with _lock:
        if _library is None and _failed is None:
            try:
                _library = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _failed = str(error)
                warnings.warn(f"lowmem: the CPU quantized-Adam kernel could not be built ({_failed}); "
                              f"quantized optimizer states use the slower pure-torch path", RuntimeWarning)
    return _library is not None


class Tables(NamedTuple):
    """The two state maps as the kernel reads them: each map's values (fp32) and its encode table."""

    m_values: torch.Tensor
    v_values: torch.Tensor
    m_encode: torch.Tensor
    v_encode: torch.Tensor


def encode_table(below: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The kernel's encode table (int32 per 16-bit prefix: count << 16 | the low 16 bits of the inside midpoint's
    order-preserving form, 0xFFFF where none), from a map's prefix tables: per 16-bit prefix of a float, the
    midpoints below it and the one midpoint inside it (+inf where none)."""
    bits = threshold.view(torch.int32)
    low = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) & 0xFFFF
    low = torch.where(torch.isinf(threshold), torch.full_like(low, 0xFFFF), low)
    return (below.to(torch.int32) << 16) | low


def _run(bits: int, grad: torch.Tensor, weight: Optional[torch.Tensor], out: Optional[torch.Tensor],
         moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tables: Tables, step: int,
         beta1: float, beta2: float, eps: float, eps_scaled: bool, lr: float, decay: float, write: int) -> None:
    """`moments`: the codes and absmax scales (m, v, m_absmax, v_absmax), contiguous, updated in place."""
    grad = grad.contiguous()
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    pointers = [t.data_ptr() if t is not None else None for t in (grad, weight, out, *moments, *tables)]
    status = _library.lowmem_quantized_adam(
        bits, grad.numel(), torch.get_num_threads(), *pointers, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bias1,
        bias2_sqrt, bias2_sqrt / bias1, -lr, 1.0 - decay, int(eps_scaled), write)
    if status != 0:
        raise ValueError(f"no {bits}-bit quantized Adam kernel")


def adam_direction(grad: torch.Tensor, moments: tuple[torch.Tensor, ...], tables: Tables, bits: int, step: int,
                   beta1: float, beta2: float, eps: float, eps_scaled: bool) -> torch.Tensor:
    """Adam on the stored moments (updated in place): the bias-corrected direction, a fresh fp32 tensor."""
    out = torch.empty(grad.shape, dtype=torch.float32)
    _run(bits, grad, None, out, moments, tables, step, beta1, beta2, eps, eps_scaled, 0.0, 0.0, DIRECTION)
    return out


def adam_update(weight: torch.Tensor, grad: torch.Tensor, moments: tuple[torch.Tensor, ...], tables: Tables,
                bits: int, step: int, lr: float, beta1: float, beta2: float, eps: float, eps_scaled: bool,
                decay: float, decay_after: bool) -> None:
    """Adam on the stored moments and the step of the contiguous fp32 `weight`, in place (decay = lr * wd)."""
    _run(bits, grad, weight, None, moments, tables, step, beta1, beta2, eps, eps_scaled, lr, decay,
         DECAY_AFTER if decay_after else DECAY_BEFORE)
