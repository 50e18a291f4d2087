"""Triton's `ModelConfig` protobuf, as tritonclient ships it: every config.pbtxt is built as data,
converted through this schema (unknown fields and enum values fail here), written as text, and parsed
back from that text before anything is written.

protobuf and tritonclient are imported on first use, so `import ettin_export.deploy` stays light.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ettin_runtime.errors import EttinError, MissingDependency

INSTALL_HINT = "pip install 'ettin-export[triton-client]'  (tritonclient[grpc] and protobuf>=6.33.5)"


class ConfigError(EttinError, ValueError):
    """A model configuration that Triton would reject, or that does not fit the model it serves."""


_model_config_module = None


def model_config_module():
    """`tritonclient.grpc.model_config_pb2`, loaded from its file when tritonclient lacks grpc support."""
    global _model_config_module
    if _model_config_module is not None:
        return _model_config_module
    try:
        from tritonclient.grpc import model_config_pb2 as module
    except ImportError as first_error:  # tritonclient without grpcio: the generated module needs only protobuf
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependency(
                f"`ettin-export deploy` checks every config.pbtxt against Triton's ModelConfig schema, which "
                f"comes with tritonclient: {INSTALL_HINT}."
            ) from first_error
        path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
        if not path.is_file():
            raise MissingDependency(f"tritonclient is installed but has no {path}; {INSTALL_HINT}.") from first_error
        module_spec = importlib.util.spec_from_file_location("_ettin_triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # protobuf's runtime/gencode version check raises its own types
            raise MissingDependency(f"Cannot load Triton's ModelConfig schema from {path}: {error}. {INSTALL_HINT}.") from error
    except Exception as error:  # protobuf's runtime/gencode version check (older protobuf than the gencode)
        raise MissingDependency(f"Cannot load Triton's ModelConfig schema: {error}. {INSTALL_HINT}.") from error
    _model_config_module = module
    return module


def config_to_text(config: dict, header: str = "") -> str:
    """The config.pbtxt text of `config` (a dict in the protobuf's field names), through the schema."""
    from google.protobuf import json_format, text_format

    message_type = model_config_module().ModelConfig
    try:
        message = json_format.ParseDict(config, message_type())
    except json_format.ParseError as error:
        raise ConfigError(f"config for {config.get('name')!r} does not fit Triton's ModelConfig schema: {error}") from error
    return header + text_format.MessageToString(message)


def parse_config(text: str, where: str):
    """Parse config.pbtxt text into a ModelConfig message; a clear error names the file and the field."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_module().ModelConfig())
    except text_format.ParseError as error:
        raise ConfigError(f"{where} is not a valid Triton model configuration: {error}") from error
