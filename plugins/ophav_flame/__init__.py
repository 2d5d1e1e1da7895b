"""ophav plugin ``flame``: a FLAME tracker for users who have the FLAME model (which cannot be redistributed).

Modules: :mod:`.weights` (the weight-store entries), :mod:`.unpickle` (the restricted reader of FLAME's
chumpy pickles), :mod:`.model` (arrays, verification, coordinates), :mod:`.layer` (FLAME in PyTorch),
:mod:`.embedding` (MediaPipe's 468 landmarks on the FLAME surface, derived from the user's model),
:mod:`.fitting` (batched landmark fit), :mod:`.tracker` (the ``flame`` Tracker), :mod:`.synthetic` (a
FLAME-layout test model).
"""
