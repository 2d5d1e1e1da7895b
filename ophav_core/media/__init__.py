"""Pictures and videos in and out: reading portraits and videos, writing PNGs, videos and contact sheets, and the
overlays a person looks at. Every picture (a portrait, a frame of an image folder) enters through
:func:`read_portrait`. Heavy libraries (Pillow, OpenCV, PyAV, matplotlib) are imported inside the functions."""
from ophav_core.media.io import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, contact_sheet, encode_png, mask_overlay, mesh_overlay,
                                 pick_evenly, plot_pose, read_image, read_video, save_png, square_resize, write_video)
from ophav_core.media.portrait import MAX_MEGAPIXELS, read_portrait, rotate_quarter_turns, track_upright

__all__ = ["IMAGE_SUFFIXES", "MAX_MEGAPIXELS", "VIDEO_SUFFIXES", "contact_sheet", "encode_png", "mask_overlay",
           "mesh_overlay", "pick_evenly", "plot_pose", "read_image", "read_portrait", "read_video",
           "rotate_quarter_turns", "save_png", "square_resize", "track_upright", "write_video"]
