// Element-wise optimizer maths, shared by the CPU and CUDA paths, and the
// optimizer table (OPTAX_PAGED_OPTIMIZERS, at the end) that every handler,
// FFI target and the Python side are generated from.
//
// Each optimizer is a struct with its name (its FFI target is
// "optax_paged_" + name), the number of moments it keeps, whether each
// moment is signed (which quantization map it uses), the names of its
// hyperparameter slots (kSlots: the one list of their order; Python packs
// the vector by these names and Load reads them by name through
// OPTAX_PAGED_SLOT), and an Update that advances the moments of one
// element in fp32 registers and returns the parameter update. It knows
// nothing of quantization or of where the state lives. Optional flags:
// kFourBitStates (its kernels are built for 4-bit states too) and
// kStochasticFourBit (its signed 4-bit codes are rounded stochastically).
#ifndef OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_
#define OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_

#include <array>
#include <cmath>
#include <string>
#include <type_traits>

#include "quantization.h"

namespace optax_paged {

inline constexpr int kMaxMoments = 3;

// Length of the hyperparameter operand; each optimizer uses a prefix of it,
// and the last slot holds the step count's bits (the seed of stochastic
// rounding). The layout must match optax_paged/_src/hyperparams.py.
inline constexpr int kNumHyperparams = 16;
inline constexpr int kSeedIndex = kNumHyperparams - 1;

// The index of slot `name` in `slots`, or -1.
template <std::size_t N>
constexpr int SlotIndex(const std::array<const char*, N>& slots,
                        const char* name) {
  for (std::size_t i = 0; i < N; ++i) {
    const char* a = slots[i];
    const char* b = name;
    while (*a != '\0' && *a == *b) ++a, ++b;
    if (*a == *b) return static_cast<int>(i);
  }
  return -1;
}

template <int kIndex>
struct CheckedSlot {
  static_assert(kIndex >= 0, "no hyperparameter slot of that name in kSlots");
  static constexpr int value = kIndex;
};

// The hyperparameter `name` of vector h, inside an optimizer struct: the
// index comes from kSlots at compile time, and a name that kSlots lacks
// does not compile, so the slot order is written once.
#define OPTAX_PAGED_SLOT(h, name) \
  (h)[::optax_paged::CheckedSlot<::optax_paged::SlotIndex(kSlots, #name)>::value]

// AdamW with optax's convention (Loshchilov & Hutter, 2019):
//   m = (1 - b1) g + b1 m,  v = (1 - b2) g^2 + b2 v,
//   u = -lr (m / bc1 / (sqrt(v / bc2 + eps_root) + eps) + wd p),
// with bias corrections bc = 1 - b^t computed by the caller. The divisions
// by bc1 and bc2 are multiplications by reciprocals computed once per call,
// since an IEEE division per element costs the GPU kernel more than the
// ulp it changes. Plain Adam is AdamW with wd = 0. With nesterov (optax's
// adamw(nesterov=True), NAdam's look-ahead) m / bc1 becomes
// b1 m / (1 - b1^(t+1)) + (1 - b1) g / bc1. Both options are uniform
// branches, so a step without them pays only the test.
struct AdamW {
  static constexpr const char* kName = "adamw";
  static constexpr int kNumMoments = 2;
  static constexpr bool kFourBitStates = true;
  // The first moment is signed, the second (of squares) is not.
  OPTAX_PAGED_HD static constexpr bool IsSigned(int moment) {
    return moment == 0;
  }

  struct Scalars {
    float lr, b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
    float inverse_bc1, inverse_bc2, eps_root, inverse_bc1_next;
    bool nesterov;
  };

  static constexpr std::array kSlots = {
      "learning_rate",    "b1",
      "one_minus_b1",     "b2",
      "one_minus_b2",     "eps",
      "weight_decay",     "bias_correction1",
      "bias_correction2", "eps_root",
      "nesterov",         "bias_correction1_next"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, b1),
                   OPTAX_PAGED_SLOT(h, one_minus_b1),
                   OPTAX_PAGED_SLOT(h, b2),
                   OPTAX_PAGED_SLOT(h, one_minus_b2),
                   OPTAX_PAGED_SLOT(h, eps),
                   OPTAX_PAGED_SLOT(h, weight_decay),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction1),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction2),
                   OPTAX_PAGED_SLOT(h, eps_root),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction1_next),
                   OPTAX_PAGED_SLOT(h, nesterov) != 0.0f};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    const float m = s.one_minus_b1 * g + s.b1 * moments[0];
    const float v = s.one_minus_b2 * (g * g) + s.b2 * moments[1];
    moments[0] = m;
    moments[1] = v;
    float m_hat = m * s.inverse_bc1;
    if (s.nesterov) {
      m_hat = s.b1 * (m * s.inverse_bc1_next) +
              s.one_minus_b1 * (g * s.inverse_bc1);
    }
    float v_hat = v * s.inverse_bc2;
    if (s.eps_root != 0.0f) v_hat = v_hat + s.eps_root;
    float direction = m_hat / (sqrtf(v_hat) + s.eps);
    if (decay) direction = direction + s.weight_decay * p;
    return -s.lr * direction;
  }
};

// Lion (Chen et al., 2023), as optax.lion:
//   u = -lr (sign((1 - b1) g + b1 m) + wd p),  m = (1 - b2) g + b2 m.
struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr int kNumMoments = 1;
  static constexpr bool kFourBitStates = true;
  // 4-bit momentum codes are rounded stochastically (EncodeFourBitStochastic).
  static constexpr bool kStochasticFourBit = true;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int) { return true; }

  struct Scalars {
    float lr, b1, one_minus_b1, b2, one_minus_b2, weight_decay;
  };

  static constexpr std::array kSlots = {"learning_rate", "b1", "one_minus_b1",
                                        "b2", "one_minus_b2", "weight_decay"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate), OPTAX_PAGED_SLOT(h, b1),
                   OPTAX_PAGED_SLOT(h, one_minus_b1), OPTAX_PAGED_SLOT(h, b2),
                   OPTAX_PAGED_SLOT(h, one_minus_b2),
                   OPTAX_PAGED_SLOT(h, weight_decay)};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    const float mixed = s.one_minus_b1 * g + s.b1 * moments[0];
    moments[0] = s.one_minus_b2 * g + s.b2 * moments[0];
    float direction = mixed > 0.0f ? 1.0f : (mixed < 0.0f ? -1.0f : mixed);
    if (decay) direction = direction + s.weight_decay * p;
    return -s.lr * direction;
  }
};

// AdEMAMix (Pagliardini et al., 2024), as optax.contrib.ademamix: a fast
// EMA m1 (bias-corrected), a slow EMA m2 (not corrected) mixed with weight
// alpha, and the second moment v:
//   u = -lr ((m1 / bc1 + alpha m2) / (sqrt(v / bc2) + eps) + wd p).
// b3 and alpha arrive per step, so their warm-up schedules cost nothing.
struct AdEMAMix {
  static constexpr const char* kName = "ademamix";
  static constexpr int kNumMoments = 3;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int moment) {
    return moment < 2;
  }

  struct Scalars {
    float lr, b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
    float inverse_bc1, inverse_bc2, b3, one_minus_b3, alpha;
  };

  static constexpr std::array kSlots = {
      "learning_rate",    "b1",  "one_minus_b1", "b2",
      "one_minus_b2",     "eps", "weight_decay", "bias_correction1",
      "bias_correction2", "b3",  "one_minus_b3", "alpha"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, b1),
                   OPTAX_PAGED_SLOT(h, one_minus_b1),
                   OPTAX_PAGED_SLOT(h, b2),
                   OPTAX_PAGED_SLOT(h, one_minus_b2),
                   OPTAX_PAGED_SLOT(h, eps),
                   OPTAX_PAGED_SLOT(h, weight_decay),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction1),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction2),
                   OPTAX_PAGED_SLOT(h, b3),
                   OPTAX_PAGED_SLOT(h, one_minus_b3),
                   OPTAX_PAGED_SLOT(h, alpha)};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    const float m1 = s.one_minus_b1 * g + s.b1 * moments[0];
    const float m2 = s.one_minus_b3 * g + s.b3 * moments[1];
    const float v = s.one_minus_b2 * (g * g) + s.b2 * moments[2];
    moments[0] = m1;
    moments[1] = m2;
    moments[2] = v;
    float direction = (m1 * s.inverse_bc1 + s.alpha * m2) /
                      (sqrtf(v * s.inverse_bc2) + s.eps);
    if (decay) direction = direction + s.weight_decay * p;
    return -s.lr * direction;
  }
};

// SGD with momentum (heavy ball, as optax.sgd / optax.trace and PyTorch):
//   m = g' + momentum m,  u = -lr m,  with g' = g + wd p (coupled L2, as
// PyTorch and bitsandbytes apply weight decay in SGD).
struct SgdMomentum {
  static constexpr const char* kName = "sgd";
  static constexpr int kNumMoments = 1;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int) { return true; }

  struct Scalars {
    float lr, momentum, weight_decay;
    bool nesterov;
  };

  static constexpr std::array kSlots = {"learning_rate", "momentum",
                                        "weight_decay", "nesterov"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, momentum),
                   OPTAX_PAGED_SLOT(h, weight_decay),
                   OPTAX_PAGED_SLOT(h, nesterov) != 0.0f};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    if (decay) g = g + s.weight_decay * p;
    moments[0] = g + s.momentum * moments[0];
    // optax.sgd(nesterov=True): the update looks one momentum step ahead.
    const float direction =
        s.nesterov ? g + s.momentum * moments[0] : moments[0];
    return -s.lr * direction;
  }
};

// RMSprop, as optax.rmsprop (eps inside the square root):
//   v = (1 - decay) g^2 + decay v,  u = -lr g / sqrt(v + eps).
struct RmsProp {
  static constexpr const char* kName = "rmsprop";
  static constexpr int kNumMoments = 1;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int) { return false; }

  struct Scalars {
    float lr, decay, one_minus_decay, eps;
  };

  static constexpr std::array kSlots = {"learning_rate", "decay",
                                        "one_minus_decay", "eps"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, decay),
                   OPTAX_PAGED_SLOT(h, one_minus_decay),
                   OPTAX_PAGED_SLOT(h, eps)};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    (void)p, (void)decay;
    moments[0] = s.one_minus_decay * (g * g) + s.decay * moments[0];
    return -s.lr * (g * (1.0f / sqrtf(moments[0] + s.eps)));
  }
};

// Adagrad, as optax.adagrad: s = s + g^2 (s starts at the initial
// accumulator value), u = -lr g / sqrt(s + eps), zero where s is zero.
struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr int kNumMoments = 1;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int) { return false; }

  struct Scalars {
    float lr, eps;
  };

  static constexpr std::array kSlots = {"learning_rate", "eps"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, eps)};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    (void)p, (void)decay;
    moments[0] = g * g + moments[0];
    const float scale =
        moments[0] > 0.0f ? 1.0f / sqrtf(moments[0] + s.eps) : 0.0f;
    return -s.lr * (scale * g);
  }
};

// AdaBelief (Zhuang et al., 2020), as optax.adabelief, with decoupled
// weight decay: the second moment is of the gap between the gradient and
// its prediction m,
//   m = (1 - b1) g + b1 m,  s = (1 - b2) (g - m)^2 + b2 s + eps_root,
//   u = -lr (m / bc1 / (sqrt(s / bc2) + eps) + wd p).
struct AdaBelief {
  static constexpr const char* kName = "adabelief";
  static constexpr int kNumMoments = 2;
  OPTAX_PAGED_HD static constexpr bool IsSigned(int moment) {
    return moment == 0;
  }

  struct Scalars {
    float lr, b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, weight_decay;
    float inverse_bc1, inverse_bc2;
  };

  static constexpr std::array kSlots = {
      "learning_rate", "b1",           "one_minus_b1",     "b2",
      "one_minus_b2",  "eps",          "eps_root",         "weight_decay",
      "bias_correction1", "bias_correction2"};

  OPTAX_PAGED_HD static Scalars Load(const float* h) {
    return Scalars{OPTAX_PAGED_SLOT(h, learning_rate),
                   OPTAX_PAGED_SLOT(h, b1),
                   OPTAX_PAGED_SLOT(h, one_minus_b1),
                   OPTAX_PAGED_SLOT(h, b2),
                   OPTAX_PAGED_SLOT(h, one_minus_b2),
                   OPTAX_PAGED_SLOT(h, eps),
                   OPTAX_PAGED_SLOT(h, eps_root),
                   OPTAX_PAGED_SLOT(h, weight_decay),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction1),
                   1.0f / OPTAX_PAGED_SLOT(h, bias_correction2)};
  }

  OPTAX_PAGED_HD static float Update(const Scalars& s, float g, float p,
                                     bool decay, float* moments) {
    const float m = s.one_minus_b1 * g + s.b1 * moments[0];
    const float gap = g - m;
    const float v = s.one_minus_b2 * (gap * gap) + s.b2 * moments[1] +
                    s.eps_root;
    moments[0] = m;
    moments[1] = v;
    float direction =
        (m * s.inverse_bc1) / (sqrtf(v * s.inverse_bc2) + s.eps);
    if (decay) direction = direction + s.weight_decay * p;
    return -s.lr * direction;
  }
};

// The optimizer table: X(Struct) for every optimizer the extension builds.
// The CPU and CUDA handlers, their FFI targets and the table the extension
// exports to Python (optimizer_table()) are all generated from this list;
// adding an optimizer is a struct above plus a line here.
#define OPTAX_PAGED_OPTIMIZERS(X) \
  X(AdamW)                        \
  X(Lion)                         \
  X(AdEMAMix)                     \
  X(SgdMomentum)                  \
  X(RmsProp)                      \
  X(Adagrad)                      \
  X(AdaBelief)

// Whether an optimizer rounds its 4-bit codes stochastically (a struct
// says so with kStochasticFourBit; nearest otherwise).
template <typename Optimizer, typename = void>
inline constexpr bool kStochasticFourBitOf = false;
template <typename Optimizer>
inline constexpr bool kStochasticFourBitOf<
    Optimizer, std::void_t<decltype(Optimizer::kStochasticFourBit)>> =
    Optimizer::kStochasticFourBit;

// Whether an optimizer's kernels are built for 4-bit states (a struct says
// so with kFourBitStates; the CUDA kernels of the others are not compiled
// for them, to keep the build time).
template <typename Optimizer, typename = void>
inline constexpr bool kFourBitStatesOf = false;
template <typename Optimizer>
inline constexpr bool kFourBitStatesOf<
    Optimizer, std::void_t<decltype(Optimizer::kFourBitStates)>> =
    Optimizer::kFourBitStates;

// What the table promises each struct provides, checked at compile time.
template <typename Optimizer>
constexpr bool CheckOptimizer() {
  static_assert(Optimizer::kNumMoments >= 1 &&
                    Optimizer::kNumMoments <= kMaxMoments,
                "kNumMoments out of range");
  static_assert(Optimizer::kSlots.size() <= kSeedIndex,
                "hyperparameter slots overlap the seed slot");
  static_assert(kStochasticFourBitOf<Optimizer> <= kFourBitStatesOf<Optimizer>,
                "kStochasticFourBit without kFourBitStates");
  static_assert(sizeof(typename Optimizer::Scalars) > 0, "Scalars");
  return true;
}
#define OPTAX_PAGED_CHECK_OPTIMIZER(Optimizer) \
  static_assert(CheckOptimizer<Optimizer>());
OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_CHECK_OPTIMIZER)
#undef OPTAX_PAGED_CHECK_OPTIMIZER

// "optax_paged_" + the optimizer's name: its FFI target, and the prefix of
// its handler's messages.
template <typename Optimizer>
const std::string& TargetName() {
  static const std::string name =
      std::string("optax_paged_") + Optimizer::kName;
  return name;
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_OPTIMIZER_MATH_H_
