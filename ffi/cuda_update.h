// The CUDA FFI handlers, exported to the nanobind module as capsules.
#ifndef OPTAX_PAGED_FFI_CUDA_UPDATE_H_
#define OPTAX_PAGED_FFI_CUDA_UPDATE_H_

#include "xla/ffi/api/api.h"

namespace optax_paged {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdamWUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLionUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdEMAMixUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kSgdUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kRmsPropUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdagradUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDeviceOrdinalCuda);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_CUDA_UPDATE_H_
