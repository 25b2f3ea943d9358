// Element-wise optimizer maths, shared by the CPU and CUDA paths.
//
// Each optimizer is a struct with the number of moments it keeps, whether
// each moment is signed (which quantization map it uses), its scalars read
// from the hyperparameter vector, and an Update that advances the moments of
// one element in fp32 registers and returns the parameter update. It knows
// nothing of quantization or of where the state lives.
#ifndef OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_
#define OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_

#include <cmath>

#include "quantization.h"

namespace optax_paged {

inline constexpr int kMaxMoments = 2;

// Length of the hyperparameter operand; each optimizer uses a prefix of it.
// The layout must match optax_paged/_src/hyperparams.py.
inline constexpr int kNumHyperparams = 12;

// AdamW with optax's convention (Loshchilov & Hutter, 2019):
//   m = (1 - b1) g + b1 m,  v = (1 - b2) g^2 + b2 v,
//   u = -lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p),
// with bias corrections bc = 1 - b^t computed by the caller. The divisions
// by bc1 and bc2 are multiplications by their reciprocals, computed once per
// call: two IEEE divisions per element were a third of the GPU kernel's
// instructions (results move by at most an ulp). Plain Adam is AdamW with
// wd = 0.
struct AdamW {
  static constexpr int kNumMoments = 2;
  // The first moment is signed, the second (of squares) is not.
  OPTAX_PAGED_HD static constexpr bool IsSigned(int moment) {
    return moment == 0;
  }

  struct Scalars {
    float lr, b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
    float inverse_bc1, inverse_bc2;
  };

  enum Index {
    kLearningRate = 0,
    kB1,
    kOneMinusB1,
    kB2,
    kOneMinusB2,
    kEps,
    kWeightDecay,
    kBiasCorrection1,
    kBiasCorrection2,
  };

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{h[kLearningRate],
                   h[kB1],
                   h[kOneMinusB1],
                   h[kB2],
                   h[kOneMinusB2],
                   h[kEps],
                   h[kWeightDecay],
                   1.0f / h[kBiasCorrection1],
                   1.0f / h[kBiasCorrection2]};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    const float m = s.one_minus_b1 * g + s.b1 * moments[0];
    const float v = s.one_minus_b2 * (g * g) + s.b2 * moments[1];
    moments[0] = m;
    moments[1] = v;
    float direction =
        (m * s.inverse_bc1) / (sqrtf(v * s.inverse_bc2) + s.eps);
    if (decay) direction = direction + s.weight_decay * p;
    return -s.lr * direction;
  }
};

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_
