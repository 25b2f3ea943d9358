// The CUDA FFI handlers, exported to the nanobind module as capsules.
#ifndef OPTAX_PAGED_FFI_CUDA_UPDATE_H_
#define OPTAX_PAGED_FFI_CUDA_UPDATE_H_

#include "optimizer_math.h"
#include "xla/ffi/api/api.h"

namespace optax_paged {

// k<Optimizer>UpdateCuda for every optimizer of the table.
#define OPTAX_PAGED_DECLARE_CUDA_HANDLER(Optimizer) \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(k##Optimizer##UpdateCuda);
OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_DECLARE_CUDA_HANDLER)
#undef OPTAX_PAGED_DECLARE_CUDA_HANDLER
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDeviceOrdinalCuda);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_CUDA_UPDATE_H_
