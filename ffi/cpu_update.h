// The CPU FFI handlers, exported to the nanobind module as capsules.
#ifndef OPTAX_PAGED_FFI_CPU_UPDATE_H_
#define OPTAX_PAGED_FFI_CPU_UPDATE_H_

#include "optimizer_math.h"
#include "xla/ffi/api/api.h"

namespace optax_paged {

// The target of the probe that tells Python a device's ordinal.
inline constexpr const char* kDeviceOrdinalTarget =
    "optax_paged_device_ordinal";

// k<Optimizer>UpdateCpu for every optimizer of the table.
#define OPTAX_PAGED_DECLARE_CPU_HANDLER(Optimizer) \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(k##Optimizer##UpdateCpu);
OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_DECLARE_CPU_HANDLER)
#undef OPTAX_PAGED_DECLARE_CPU_HANDLER
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDeviceOrdinalCpu);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_CPU_UPDATE_H_
