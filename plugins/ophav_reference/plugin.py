"""Registers the embedded reference-guided restorer (no downloaded weights)."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_restorer(register):
    register(ComponentSpec(
        stage="restorer", name="reference", factory="ophav_reference.restorer:ReferenceRestorer",
        options="ophav_reference.options:ReferenceOptions",
        summary="reference-guided: the portrait's own detail carried into each render through the tracked mesh "
                "(embedded default, no weights)",
        requires=("cv2",), extra="reference"))
