"""finer1_lib: the Fine-R1 tutorial's library (see README)."""
import logging as _logging


class _DropOptionalKernelNotice(_logging.Filter):
    """bitsandbytes warns, on CPUs with AVX512-BF16 only, that an optional 4-bit CPU kernel (the `kernels`
    package) is missing; nothing here uses it. Dropped so that outputs do not depend on the CPU's features."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
