"""The OpenAPI 3.1 document of the online service, built from the dataset schema.

Served at ``/openapi.json`` (and ``/docs.json``, so BentoML's built-in Swagger page at ``/``
shows it). Feature schemas carry the same rules ``mlops.request_validation`` enforces
(types, ranges, categories, no extra fields), so a generated client or a property-based
test knows what a valid request is.
"""

from __future__ import annotations

from typing import Any

from mlops.onnx_model import PROBA_OUTPUT
from mlops.request_validation import (
    ENTITY_ID,
    MAX_ID,
    MAX_STRING,
    NUMERIC_DATATYPE,
    STRING_DATATYPE,
    OnlineKeys,
)
from mlops.routing import FORCE_HEADER
from mlops.settings import DatasetSchema
from serving.state import DesiredState, PreloadRequest, RoutesSpec, SlotRequest

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: str, ok_schema: dict[str, Any], *errors: int, ok_status: str = "200") -> dict[str, Any]:
    why = {
        400: "Malformed request",
        401: "No token (admin; feedback token on /feedback)",
        403: "Wrong token",
        404: "Unknown model or version",
        409: "Conflicts with the current state (on /feedback: the request already has another label)",
        408: "The request body did not arrive within serving.body_timeout_seconds",
        413: "Body or batch too large",
        415: "Content-Encoding other than identity",
        410: "The async job expired; its result was deleted",
        422: "Values break the dataset schema (on /feedback: a request id the service did not issue)",
        429: "The async job queue is full (retry later)",
        503: "Overloaded or not ready (retry later)",
        504: "The model did not answer in time",
    }
    out = {ok_status: {"description": ok, **_json(ok_schema)}}
    for code in errors:
        out[str(code)] = {"description": why[code], **_json(_ref("Error"))}
    return out


def _object(**properties: Any) -> dict[str, Any]:
    """A JSON object schema with these properties (none required, others allowed)."""
    return {"type": "object", "properties": properties}


def _pydantic(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF + "{model}")
    schema.pop("$defs", None)
    return schema


def _raw_transaction(online: OnlineKeys | None) -> dict[str, Any]:
    """The optional fields of a raw transaction: window features, entity id and event time."""
    if online is None:
        return {}
    window = {"type": "number", "description": "A window feature; looked up for the entity when absent."}
    return {n: window for n in online.windows} | {
        online.entity_column: {
            "type": "string",
            "pattern": f"^{ENTITY_ID.pattern}$",
            "not": {"pattern": "[.][.]"},
            "description": "Entity id: the window features not sent are looked up for it.",
        },
        online.timestamp_column: {
            "type": "string",
            "maxLength": 40,
            "description": "Event time, ISO 8601 (without a zone: UTC); default: when the request arrives.",
        },
    }


def openapi_document(
    dataset: DatasetSchema, model_name: str, *, max_rows: int, version: str, online: OnlineKeys | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service scoring ``model_name`` on ``dataset`` (with
    ``online``: the window features, entity id and event time a raw transaction may carry)."""
    numeric = {
        f.name: {
            "type": "number",
            **({"minimum": f.min} if f.min is not None else {}),
            **({"maximum": f.max} if f.max is not None else {}),
        }
        for f in dataset.numeric
    }
    categorical = {f.name: {"type": "string", "enum": list(f.categories)} for f in dataset.categorical}
    printable = "^[ -~]+$"  # the service accepts any printable text; documented: printable ASCII
    ident = {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": printable}
    record = {
        "type": "object",
        "required": ["features"],
        "additionalProperties": False,
        "properties": {
            "features": _ref("Features"),
            "request_id": ident
            | {"description": "Your id for this row (feedback joins on it); generated when absent."},
            "entity_key": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_STRING,
                "pattern": printable,
                "description": "User/card id: canary and A/B assignment is sticky per key.",
            },
            "ts": {
                "type": "string",
                "description": "Client event time (informational; the log records server time).",
            },
        },
    }

    def tensor(name: str, datatype: str, item: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["name", "shape", "datatype", "data"],
            "additionalProperties": False,
            "properties": {
                "name": {"const": name},
                "shape": {
                    "type": "array",
                    "prefixItems": [{"type": "integer", "minimum": 1, "maximum": max_rows}, {"const": 1}],
                    "minItems": 2,
                    "maxItems": 2,
                    "description": "[N, 1], the same N for every input",
                },
                "datatype": {"const": datatype},
                "data": {"type": "array", "items": item, "minItems": 1, "maxItems": max_rows},
                "parameters": {"type": "object"},
            },
        }

    tensors = [tensor(n, NUMERIC_DATATYPE, numeric[n]) for n in dataset.numeric_names]
    tensors += [tensor(n, STRING_DATATYPE, categorical[n]) for n in dataset.categorical_names]
    tensor_meta = _object(
        name={"type": "string"},
        datatype={"type": "string"},
        shape={"type": "array", "items": {"type": "integer"}},
    )
    callback = {"type": "string", "format": "uri", "maxLength": 2000}
    batch = {
        "type": "object",
        "required": ["records"],
        "additionalProperties": False,
        "properties": {
            "records": {"type": "array", "items": _ref("Record"), "minItems": 1, "maxItems": max_rows}
        },
    }
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Features": {
            "type": "object",
            "required": list(dataset.feature_names),
            "additionalProperties": False,
            "properties": numeric | categorical | _raw_transaction(online),
        },
        "Record": record,
        "PredictRequest": {
            "oneOf": [
                _ref("Record"),
                batch,
            ]
        },
        "Prediction": {
            "type": "object",
            "properties": {
                "request_id": {"type": "string"},
                "score": {"type": "number"},
                "decision": {"type": "boolean"},
                "variant": {"type": "string", "enum": ["stable", "candidate"]},
                "model_name": {"type": "string"},
                "model_version": {"type": "integer"},
            },
        },
        "PredictResponse": {
            "type": "object",
            "properties": {
                "predictions": {"type": "array", "items": _ref("Prediction")},
                "mode": {"type": "string"},
            },
        },
        "AsyncPredictRequest": {
            "description": "A /predict body, plus an optional callback_url: POSTed the job's status "
            "body when it is done or failed. Only hosts in serving.async_jobs.callback_hosts "
            "(loopback by default) are accepted; any other is a 400.",
            "oneOf": [
                {
                    **record,
                    "properties": {**record["properties"], "callback_url": callback},
                },
                {
                    **batch,
                    "properties": {**batch["properties"], "callback_url": callback},
                },
            ],
        },
        "AsyncJobAccepted": {
            "type": "object",
            "required": ["job_id", "state", "status_url"],
            "properties": {
                "job_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"},
                "state": {"const": "queued"},
                "status_url": {"type": "string"},
            },
        },
        "AsyncJob": {
            "type": "object",
            "required": ["job_id", "state", "created_at", "updated_at", "attempts"],
            "properties": {
                "job_id": {"type": "string"},
                "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "expired"]},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "expires_at": {"type": "string", "format": "date-time"},
                "attempts": {
                    "type": "integer",
                    "description": "Times a worker started the job (more than 1 after a restart "
                    "interrupted it; its request ids stay the same).",
                },
                "result": {**_ref("PredictResponse"), "description": "When done: what /predict answers."},
                "error": {"type": "string", "description": "When failed or expired: why."},
                "status": {"type": "integer", "description": "When failed: the HTTP status /predict gave."},
                "callback": {"type": "string", "enum": ["waiting", "pending", "delivered", "failed"]},
            },
        },
        "FeedbackItem": {
            "type": "object",
            "required": ["request_id", "label"],
            "additionalProperties": False,
            "properties": {
                "request_id": ident,
                "label": {"type": "integer", "enum": list(dataset.label_values)},
            },
        },
        "FeedbackRequest": {
            "oneOf": [
                _ref("FeedbackItem"),
                {
                    "type": "object",
                    "required": ["feedback"],
                    "additionalProperties": False,
                    "properties": {
                        "feedback": {"type": "array", "items": _ref("FeedbackItem"), "minItems": 1}
                    },
                },
            ]
        },
        "InferTensor": {"oneOf": tensors},
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "additionalProperties": False,
            "properties": {
                "id": ident,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "entity_key": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_STRING,
                            "pattern": printable,
                        },
                        "binary_data_output": {
                            "type": "boolean",
                            "description": "Answer every output as binary tensor data.",
                        },
                    },
                },
                "inputs": {"type": "array", "items": _ref("InferTensor"), "minItems": 1},
                "outputs": {
                    "type": "array",
                    "items": {
                        **_object(
                            name={"type": "string", "enum": [PROBA_OUTPUT]},
                            parameters=_object(binary_data={"type": "boolean"}),
                        ),
                        "required": ["name"],
                    },
                },
            },
        },
        "InferResponse": _object(
            model_name={"type": "string"},
            model_version={"type": "string"},
            id={"type": "string"},
            parameters={"type": "object"},
            outputs={
                "type": "array",
                "items": _object(
                    **tensor_meta["properties"],
                    data={"type": "array"},
                    parameters=_object(binary_data_size={"type": "integer"}),
                ),
            },
        ),
        "ModelMetadata": _object(
            name={"type": "string"},
            versions={"type": "array", "items": {"type": "string"}},
            platform={"type": "string"},
            inputs={"type": "array", "items": tensor_meta},
            outputs={"type": "array", "items": tensor_meta},
        ),
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}}},
        "ServingState": {
            "type": "object",
            "description": "The DesiredState fields plus slots, pool and bookkeeping.",
        },
        "RoutesSpec": _pydantic(RoutesSpec),
        "DesiredState": _pydantic(DesiredState),
        "SlotRequest": _pydantic(SlotRequest),
        "PreloadRequest": _pydantic(PreloadRequest),
    }
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": [model_name]},
    }
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999_999},
    }
    force = {
        "name": FORCE_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": ["stable", "candidate"]},
        "description": (
            "Force a variant (honoured in canary, ab and blue_green; ignored in single and shadow). "
            "Forced answers are logged as forced and count in no rollout gate or A/B test."
        ),
    }
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 200},
        "description": "Repeating a call with the same key returns the first answer without applying it again.",
    }
    admin = {"security": [{"bearer": []}], "tags": ["admin"]}
    admin_errors = (400, 401, 403, 404, 409, 422, 503)
    infer_errors = (400, 404, 408, 413, 415, 422, 503, 504)
    binary_header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Binary tensor data extension: the body starts with this many bytes of JSON "
        "(the InferRequest), followed by the data of each input whose parameters.binary_data_size "
        "is set, in input order (FP32 little-endian float32; BYTES a little-endian uint32 length "
        "before each UTF-8 element). Outputs asked for with parameters.binary_data (or every output, "
        "with the request's parameters.binary_data_output) come back the same way, the answer's JSON "
        "length in this response header.",
    }

    def infer(summary: str, parameters: list[dict[str, Any]], *errors: int) -> dict[str, Any]:
        """An OIP infer route: an InferRequest in, an InferResponse out."""
        return {
            "post": {
                "parameters": parameters,
                "summary": summary,
                "requestBody": {"required": True, **_json(_ref("InferRequest"))},
                "responses": _responses("Outputs", _ref("InferResponse"), *errors),
            }
        }

    def admin_change(
        summary: str, parameters: list[dict[str, Any]], body: str | None, ok: str = "Applied state"
    ) -> dict[str, Any]:
        """An admin operation that changes the serving state and answers the new one."""
        op: dict[str, Any] = {**admin, "summary": summary}
        if parameters:
            op["parameters"] = parameters
        if body:
            op["requestBody"] = {"required": True, **_json(_ref(body))}
        op["responses"] = _responses(ok, _ref("ServingState"), *admin_errors)
        return op

    paths: dict[str, Any] = {
        "/predict": {
            "post": {
                "summary": "Score one record or many; each is routed (stable/candidate) and logged.",
                "parameters": [force],
                "requestBody": {"required": True, **_json(_ref("PredictRequest"))},
                "responses": _responses("Scores", _ref("PredictResponse"), 400, 408, 413, 422, 503, 504),
            }
        },
        "/predict/async": {
            "post": {
                "summary": "Queue a /predict body as a job (durable across restarts): 202 with the "
                "job id at once; 429 when serving.async_jobs.max_pending jobs wait or run.",
                "parameters": [force],
                "requestBody": {"required": True, **_json(_ref("AsyncPredictRequest"))},
                "responses": _responses(
                    "Queued", _ref("AsyncJobAccepted"), 400, 404, 408, 413, 422, 429, 503, ok_status="202"
                ),
            }
        },
        "/predict/async/{job_id}": {
            "get": {
                "summary": "An async job's state; when done, the answer /predict would have given.",
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": _responses("The job", _ref("AsyncJob"), 404, 410, 503),
            }
        },
        "/feedback": {
            "post": {
                "summary": (
                    "The outcome (label) of earlier requests, by the request_id the service issued; "
                    "needs the feedback (or admin) token. All or none: an id the service did not issue "
                    "is a 422, a label differing from a request's first one a 409."
                ),
                "security": [{"bearer": []}],
                "tags": ["feedback"],
                "requestBody": {"required": True, **_json(_ref("FeedbackRequest"))},
                "responses": _responses(
                    "Accepted", {"type": "object"}, 400, 401, 403, 408, 409, 413, 422, 503, ok_status="202"
                ),
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics per variant.",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v2": {
            "get": {
                "summary": "OIP server metadata",
                "responses": _responses("Server metadata", {"type": "object"}),
            }
        },
        "/v2/health/live": {
            "get": {"summary": "OIP liveness", "responses": _responses("Live", _ref("Ready"))}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "OIP readiness (a model is in the stable slot)",
                "responses": _responses("Ready", _ref("Ready"), 503),
            }
        },
        "/v2/models/{name}": {
            "get": {
                "parameters": [name_param],
                "summary": "OIP model metadata",
                "responses": _responses("Metadata", _ref("ModelMetadata"), 404),
            }
        },
        "/v2/models/{name}/ready": {
            "get": {
                "parameters": [name_param],
                "summary": "OIP model readiness",
                "responses": _responses("Ready", _ref("Ready"), 404, 503),
            }
        },
        "/v2/models/{name}/infer": infer(
            "OIP inference, routed like /predict", [name_param, force, binary_header], *infer_errors
        ),
        "/v2/models/{name}/versions/{version}": {
            "get": {
                "parameters": [name_param, version_param],
                "summary": "OIP model version metadata",
                "responses": _responses("Metadata", _ref("ModelMetadata"), 400, 404),
            }
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "get": {
                "parameters": [name_param, version_param],
                "summary": "OIP model version readiness (loaded)",
                "responses": _responses("Ready", _ref("Ready"), 400, 404, 503),
            }
        },
        "/v2/models/{name}/versions/{version}/infer": infer(
            "OIP inference on one version (not routed; logged as forced). A version that is not "
            "loaded answers 404, unless serving.load_on_demand is on and the admin token is sent.",
            [name_param, version_param, binary_header],
            401,
            403,
            *infer_errors,
        ),
        "/admin/state": {
            "get": {
                **admin,
                "summary": "Current routes, slots and pool",
                "responses": _responses("State", _ref("ServingState"), 401, 403),
            },
            "put": admin_change("Apply a complete desired state (idempotent)", [key], "DesiredState"),
        },
        "/admin/routes": {"post": admin_change("Change the routes, slots unchanged", [key], "RoutesSpec")},
        "/admin/slots/{slot}": {
            "post": admin_change(
                "Load a version (or an alias's version) into a slot, routes unchanged",
                [
                    {
                        "name": "slot",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["stable", "candidate"]},
                    },
                    key,
                ],
                "SlotRequest",
            )
        },
        "/admin/flip": {"post": admin_change("Blue-green: make the other slot active", [key], None)},
        "/admin/models": {
            "post": admin_change(
                "Load a version into the pool without a slot", [], "PreloadRequest", ok="State"
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{model_name} online inference",
            "version": version,
            "description": "Traffic-routed scoring (stable/candidate), Open Inference Protocol v2 "
            "(with the binary_tensor_data extension), feedback and the admin API of the MLOps "
            "platform's serving layer.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
