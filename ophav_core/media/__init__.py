"""Pictures and videos in and out: reading portraits and videos, writing PNGs, videos and contact sheets, and the
overlays a person looks at. Heavy libraries (OpenCV, PyAV, matplotlib) are imported inside the functions."""
from ophav_core.media.io import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, contact_sheet, encode_png, mask_overlay, mesh_overlay,
                                 pick_evenly, plot_pose, read_image, read_video, save_png, square_resize, write_video)

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "contact_sheet", "encode_png", "mask_overlay", "mesh_overlay",
           "pick_evenly", "plot_pose", "read_image", "read_video", "save_png", "square_resize", "write_video"]
