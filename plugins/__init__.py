"""Native code around the selective scan: the CUDA kernel source (``selective_scan.cu``), its
NVRTC compile and launch parameters (``launch``), and the TensorRT plugin (``trt_plugin``)."""


def register(jit: bool = False) -> None:
    """Load the ``mame::SelectiveScan`` TensorRT plugin; call before parsing or deserialising.

    Raises UserError, saying how to install TensorRT, where TensorRT is missing or too old for
    ahead-of-time Python plugins. ``jit=True`` also binds the debugging Python implementation.
    """
    from mame_deploy.engine import require_tensorrt

    trt = require_tensorrt("the mame::SelectiveScan plugin")
    if not hasattr(trt, "QuickPluginCreationRequest"):
        from mame_deploy.errors import UserError

        raise UserError(
            f"TensorRT {trt.__version__} has no ahead-of-time Python plugins; install TensorRT "
            "10.9 or newer with pip install -U 'mame-deploy[trt]'"
        )
    from mame_deploy.plugins.trt_plugin import register_plugin

    register_plugin(jit=jit)
