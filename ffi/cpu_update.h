// The CPU FFI handlers, exported to the nanobind module as capsules.
#ifndef OPTAX_PAGED_FFI_CPU_UPDATE_H_
#define OPTAX_PAGED_FFI_CPU_UPDATE_H_

#include "xla/ffi/api/api.h"

namespace optax_paged {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdamWUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLionUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdEMAMixUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kSgdUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kRmsPropUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAdagradUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDeviceOrdinalCpu);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_CPU_UPDATE_H_
