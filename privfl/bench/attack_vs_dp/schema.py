"""The documented JSON Schema (draft 2020-12) of ``attack-vs-dp``'s ``results.json``.

Units: ``psnr_db`` in dB on [0, 1] images; rates (``auc``, ``tpr_at_*``) are fractions; ``epsilon``
at ``delta`` from the defense's accountant over the rounds actually run (``null`` without DP);
bytes are per round or per client as named; seconds are wall-clock. ``docs/attack_vs_dp.md``
describes every field.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

_number = {"type": "number"}
_nullable_number = {"type": ["number", "null"]}
_rate = {"type": "number", "minimum": 0, "maximum": 1}

_inversion = {
    "type": "object",
    "required": [
        "batch",
        "attacked",
        "psnr_db",
        "psnr_db_per_image",
        "ssim",
        "iterations_per_second",
        "seconds",
        "upload_bytes_per_client",
    ],
    "properties": {
        "batch": {"type": "integer", "minimum": 1},
        "attacked": {"enum": ["client 0's payload", "aggregate of all clients"]},
        "psnr_db": _number,
        "psnr_db_per_image": {"type": "array", "items": _number, "minItems": 1},
        "ssim": {"type": "number", "minimum": -1, "maximum": 1},
        "final_loss": _nullable_number,
        "iterations_per_second": _number,
        "seconds": {"type": "number", "minimum": 0},
        "upload_bytes_per_client": {"type": "integer", "minimum": 0},
    },
}

_setting = {
    "type": "object",
    "required": [
        "name",
        "label",
        "threat",
        "utility",
        "privacy",
        "inversion",
        "membership",
        "wire",
        "seconds",
    ],
    "properties": {
        "name": {"type": "string"},
        "label": {"type": "string"},
        "threat": {"type": "string"},
        "utility": {
            "type": "object",
            "required": ["dice", "jaccard", "accuracy", "train_loss", "dice_per_round", "model"],
            "properties": {
                "dice": _rate,
                "jaccard": _rate,
                "accuracy": _rate,
                "train_loss": _number,
                "model": {"enum": ["global", "personalized (mean over clients)"]},
                "dice_per_round": {"type": "array", "items": _rate, "minItems": 1},
            },
        },
        "privacy": {
            "type": "object",
            "required": [
                "epsilon",
                "delta",
                "accountant",
                "planned_epsilon",
                "target_epsilon",
                "claimed_epsilon",
            ],
            "properties": {
                "epsilon": {"type": ["number", "null"], "minimum": 0},
                "delta": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "accountant": {"type": ["string", "null"]},
                "planned_epsilon": {"type": ["number", "null"], "minimum": 0},
                "target_epsilon": {"type": ["number", "null"], "exclusiveMinimum": 0},
                "claimed_epsilon": _nullable_number,
            },
        },
        "inversion": {"type": "array", "items": _inversion, "minItems": 1},
        "membership": {
            "type": "object",
            "required": [
                "attack",
                "n_members",
                "n_non_members",
                "auc",
                "tpr_at_1%_fpr",
                "tpr_at_0.1%_fpr",
                "empirical_epsilon",
                "roc",
            ],
            "properties": {
                "attack": {"type": "string"},
                "n_members": {"type": "integer", "minimum": 1},
                "n_non_members": {"type": "integer", "minimum": 1},
                "auc": _rate,
                "tpr_at_1%_fpr": _rate,
                "tpr_at_0.1%_fpr": _rate,
                "empirical_epsilon": {"type": "number", "minimum": 0},
                "roc": {
                    "type": "object",
                    "required": ["fpr", "tpr"],
                    "properties": {
                        "fpr": {"type": "array", "items": _rate},
                        "tpr": {"type": "array", "items": _rate},
                    },
                },
            },
        },
        "wire": {
            "type": "object",
            "required": ["upload_bytes_per_client", "download_bytes_per_client", "bytes_per_round"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("upload_bytes_per_client", "download_bytes_per_client", "bytes_per_round")
            },
        },
        "seconds": {
            "type": "object",
            "required": ["train", "inversion", "total"],
            "properties": {k: {"type": "number", "minimum": 0} for k in ("train", "inversion", "total")},
        },
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "privfl attack-vs-dp results",
    "type": "object",
    "required": ["schema_version", "preset", "config", "data", "machine", "seconds", "settings"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "preset": {"type": "string"},
        "config": {
            "type": "object",
            "required": [
                "model",
                "clients",
                "rounds",
                "size",
                "batch_size",
                "clip",
                "delta",
                "seed",
                "seeded_noise",
            ],
        },
        "data": {"type": "string"},
        "machine": {"type": "object", "required": ["date", "python", "torch", "cpu", "cores"]},
        "seconds": {"type": "number", "minimum": 0},
        "settings": {"type": "array", "items": _setting, "minItems": 1},
    },
}


def validate_results(results: Any) -> None:
    """Raise ``jsonschema.ValidationError`` if ``results`` does not follow :data:`SCHEMA`."""
    import jsonschema

    jsonschema.validate(results, SCHEMA, cls=jsonschema.Draft202012Validator)
