"""ophav plugin: person matting and face parsing segmenters (Robust Video Matting, BiSeNet)."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_segmenter(register):
    register(ComponentSpec(
        stage="segmenter", name="rvm", factory="ophav_matting.rvm:RVMSegmenter",
        options="ophav_matting.options:RVMOptions",
        summary="Robust Video Matting (official TorchScript, recurrent over frames), cut below the jaw",
        requires=("torch",), weights=("rvm-mobilenetv3",), extra="matting"))
    register(ComponentSpec(
        stage="segmenter", name="bisenet", factory="ophav_matting.bisenet:BiSeNetSegmenter",
        options="ophav_matting.options:BiSeNetOptions",
        summary="BiSeNet face parsing without neck, cloth and hat; optionally times an RVM matte (the paper's setup)",
        requires=("torch",), weights=("bisenet-facexlib",), extra="matting"))


@hookimpl
def register_weights(register):
    from ophav_matting.weights import ALL_WEIGHTS

    for weight in ALL_WEIGHTS:
        register(weight)
