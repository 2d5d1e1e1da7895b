"""The model files inside the ``face-recognition-models`` package (0.3.0) and their licences, as checked on
2026-12-01: the package (MIT metadata, CC0 licence file) says the models are Davis King's, "licensed in the
public domain"; dlib-models' README (github.com/davisking/dlib-models) says per model what it was trained on.
The 68-point predictor is trained on iBUG 300-W, whose licence excludes commercial use, and the dataset's authors
asked that the model not be used in commercial products. dlib itself (the dlib-bin wheel) is Boost-1.0."""
from ophav_core.stages.metric import PackagedModel

SOURCE = "https://github.com/davisking/dlib-models"
PACKAGE = "face-recognition-models==0.3.0"

DESCRIPTOR = PackagedModel(
    name="dlib-face-descriptor", package=PACKAGE, path="face_recognition_models/models/"
    "dlib_face_recognition_resnet_model_v1.dat", license="public domain (CC0; Davis King), trained on FaceScrub, "
    "VGG Face and web images", needed_by="identity", source=SOURCE,
    description="dlib's ResNet-29 face descriptor, 128-d, 99.38% on LFW (22.5 MB)")
LANDMARKS5 = PackagedModel(
    name="dlib-landmarks-5", package=PACKAGE,
    path="face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
    license="public domain (CC0; Davis King), trained on dlib's own 5-point dataset", needed_by="identity",
    source=SOURCE, description="5-point shape predictor that aligns faces for the descriptor (9.2 MB)")
LANDMARKS68 = PackagedModel(
    name="dlib-landmarks-68", package=PACKAGE,
    path="face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
    license="released as public domain by Davis King, but trained on iBUG 300-W, whose licence excludes commercial "
    "use; the dataset's authors ask that it not be used in commercial products", restricted=True,
    needed_by="akd68, colour_drift, sharpness", source=SOURCE,
    description="68-point shape predictor (iBUG 300-W layout, 99.7 MB)")
MMOD = PackagedModel(
    name="dlib-mmod-face-detector", package=PACKAGE, path="face_recognition_models/models/mmod_human_face_detector.dat",
    license="public domain (CC0; Davis King), trained on dlib's face detection dataset", needed_by="faces.analyse("
    "detector='mmod')", source=SOURCE, description="dlib's MMOD CNN face detector (0.7 MB); the metrics use HOG")

HOG = PackagedModel(
    name="dlib-hog-face-detector", package="dlib-bin", path="dlib (get_frontal_face_detector, built into the library)",
    license="Boost Software License 1.0 (dlib)", needed_by="identity, detect_rate, akd68, colour_drift, sharpness",
    source="https://github.com/davisking/dlib", description="dlib's frontal face detector: HOG features and a "
    "linear SVM, compiled into dlib")

PACKAGED_MODELS = (DESCRIPTOR, LANDMARKS5, LANDMARKS68, MMOD, HOG)
