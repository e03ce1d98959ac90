"""Native code: the CUDA kernels (``selective_scan.cu``, ``token_merge.cu``), their NVRTC compile
(``nvrtc``) and launch contracts (``launch``, ``merge_launch``), and the TensorRT plugins
(``trt_plugin`` for mame::SelectiveScan, ``trt_token_merge`` for mame::TokenMerge)."""


def register(jit: bool = False) -> None:
    """Register the ``mame::SelectiveScan`` and ``mame::TokenMerge`` TensorRT plugins; call before
    parsing. An AOT engine embeds the kernels' PTX and deserialises without them; an engine built
    with ``jit=True`` (Python implementations) needs them registered, with ``jit=True``, first.

    Raises UserError, saying how to install TensorRT, where TensorRT is missing or too old for
    ahead-of-time Python plugins. ``jit=True`` also binds the debugging Python implementation.
    """
    from mame_deploy.errors import UserError
    from mame_deploy.plugins import trt_plugin, trt_token_merge
    from mame_deploy.plugins.trt_aot import require_tensorrt

    trt = require_tensorrt("the mame::SelectiveScan plugin")
    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise UserError(
            f"TensorRT {trt.__version__} has no ahead-of-time Python plugins; install TensorRT "
            "10.9 or newer with pip install -U 'mame-deploy[trt]'"
        )
    trt_plugin.register_plugin(jit=jit)
    trt_token_merge.register_plugin(jit=jit)
