"""embedder: model specs and loading, image decoding, batched encoding, content-hash vector cache."""

from embedder.base import EmbeddedBatch, Embedder
from embedder.cache import VectorCache
from embedder.factory import (
    ModelUnavailableError,
    TrainableModel,
    add_model_config,
    create_base_model,
    file_digest,
    load_embedder,
    load_trainable,
    model_version_name,
    package_model_path,
    prism_config_path,
    register_prism_configs,
    resolve_device,
    wrap_open_clip,
)
from embedder.images import (
    ImageDecodeError,
    ImageLimits,
    ImageSource,
    content_hash,
    decode_image,
    read_image_bytes,
)
from embedder.model_thread import ModelThread, ThreadBoundEmbedder
from embedder.openclip_backend import model_output_dim, pad_token_id, trim_padding
from embedder.spec import ModelSpec, ModelSpecError, SpecKind, parse_model_spec

__all__ = [
    "EmbeddedBatch",
    "Embedder",
    "ImageDecodeError",
    "ImageLimits",
    "ImageSource",
    "ModelSpec",
    "ModelSpecError",
    "ModelThread",
    "ModelUnavailableError",
    "SpecKind",
    "ThreadBoundEmbedder",
    "TrainableModel",
    "add_model_config",
    "create_base_model",
    "VectorCache",
    "content_hash",
    "decode_image",
    "file_digest",
    "load_embedder",
    "load_trainable",
    "model_output_dim",
    "pad_token_id",
    "trim_padding",
    "model_version_name",
    "package_model_path",
    "parse_model_spec",
    "prism_config_path",
    "read_image_bytes",
    "register_prism_configs",
    "resolve_device",
    "wrap_open_clip",
]
