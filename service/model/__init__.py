"""The model at run time: the ONNX session with its card (:mod:`.inference`) and the
pixels it wants (:mod:`.imaging`: decode, grey, crop, resize as the card says).

Used by the pipeline's analysis and by the similar-case library's embedder; imports
no torch.
"""
