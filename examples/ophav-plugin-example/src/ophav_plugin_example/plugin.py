"""Hook implementations only. ophav imports this module through the ``ophav`` entry point; it must stay light
(no numpy/scipy work, no model loading): the registry is built on every command."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_restorer(register):
    register(ComponentSpec(
        stage="restorer", name="unsharp",
        factory="ophav_plugin_example.restorer:UnsharpRestorer",  # imported only when a run uses it
        options="ophav_plugin_example.restorer:UnsharpOptions",   # imported to validate a config
        summary="unsharp mask inside the head alpha (example third-party plugin, no weights)",
        requires=("scipy",)))
