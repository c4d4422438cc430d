"""dfk8s: multimodal data pipelines (caption, text-to-image, image editing), locally or on Kubernetes."""

__version__ = "0.1.0"
