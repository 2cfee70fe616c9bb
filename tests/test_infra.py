"""The deployment files under infra/, checked without starting anything.

- infra/aws/cluster.yaml against Ray's own cluster-launcher schema and ``validate_config``, plus
  the security rules: token auth on every ``ray start``, the dashboard on the head's loopback,
  no credentials in the file.
- infra/kuberay/*.yaml against tests/schemas/kuberay-v1.schema.json (written from KubeRay's v1
  API: no package ships the CRD schema), with broken copies to show the schema rejects them.
- infra/iam/*.json: policy structure, S3 actions only, every resource inside the bucket.
- infra/mlflow/: passwords only as required compose variables, ports on 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-v1.schema.json"
IAM = INFRA / "iam"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
SERVE_SH = INFRA / "mlflow" / "serve.sh"
INITDB = INFRA / "mlflow" / "initdb"

# The files this suite owns; they are scanned for anything that looks like a credential.
OWN_FILES = [
    AWS_CLUSTER,
    RAYCLUSTER,
    RAYJOB,
    COMPOSE,
    DOCKERFILE,
    *sorted(INITDB.glob("*")),
    *sorted(IAM.glob("*.json")),
    INFRA / "README.md",
]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pinned_versions() -> dict[str, str]:
    """``name -> version`` of the exact pins in pyproject.toml (extras dropped)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


# --- credentials ---------------------------------------------------------------------------

# A value that is a reference, not a secret: ${VAR...}, $VAR, <PLACEHOLDER>, or nothing.
_REFERENCE = r"(?![$<{*]|\.\.\.)"
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"://[^/\s:@'\"]+:" + _REFERENCE + r"[^@\s/'\"]+@"),
    "secret assigned a literal": re.compile(
        r"(?i)\b[\w.-]*(?:password|passwd|secret|token|api_key|access_key)[\w.-]*[\"']?[ \t]*[:=][ \t]*[\"']?"
        + _REFERENCE
        + r"[A-Za-z0-9+/_.-]{8,}"
    ),
    "long random string": re.compile(r"(?<![\w/.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/.-])"),
}


def find_secrets(text: str) -> list[str]:
    """Names of the credential patterns that ``text`` matches, with the match."""
    return [f"{name}: {m.group(0)!r}" for name, pattern in SECRET_PATTERNS.items() for m in pattern.finditer(text)]


def test_secret_scanner_bites() -> None:
    fake_key_id = "AKIA" + "Q" * 16  # built here so this file holds no key-shaped literal
    assert find_secrets(f"aws_access_key_id = {fake_key_id}")
    assert find_secrets("MLFLOW_TRACKING_PASSWORD: hunter2hunter2")
    assert find_secrets("postgresql://mlflow:hunter2@postgres:5432/mlflow")
    assert find_secrets("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert not find_secrets("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?export it}")
    assert not find_secrets("postgresql://mlflow:${POSTGRES_PASSWORD:?set}@postgres:5432/mlflow")
    assert not find_secrets("export MLFLOW_AUTH_ADMIN_PASSWORD=...")


@pytest.mark.parametrize("path", OWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_credentials_in_infra_files(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    assert find_secrets(path.read_text()) == []


def test_no_keys_anywhere_under_infra() -> None:
    """The unambiguous patterns (key ids, private keys) over every file, whoever wrote it."""
    strict = [SECRET_PATTERNS["AWS access key id"], SECRET_PATTERNS["private key"]]
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(p.search(text) for p in strict), path


# --- infra/aws/cluster.yaml ----------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_cluster() -> dict[str, Any]:
    return load_yaml(AWS_CLUSTER)


def test_aws_cluster_validates_with_rays_schema(aws_cluster: dict[str, Any]) -> None:
    """As ``ray up`` does: the file itself against ray-schema.json, then ``prepare_config``
    (fills the AWS defaults, merges setup commands) and ``validate_config``. Nothing touches AWS."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws_cluster, schema)
    validate_config(prepare_config(copy.deepcopy(aws_cluster)))


def start_commands(config: dict[str, Any]) -> list[str]:
    return list(config["head_start_ray_commands"]) + list(config["worker_start_ray_commands"])


def test_every_ray_start_uses_token_auth(aws_cluster: dict[str, Any]) -> None:
    starts = [c for c in start_commands(aws_cluster) if "ray start" in c]
    assert len(starts) >= 2  # the head and the workers
    for command in starts:
        auth = command.find("RAY_AUTH_MODE=token")
        assert 0 <= auth < command.index("ray start"), command
        # The nodes' settings and credentials: exported from the copied file, not written here.
        settings = command.find("set -a; . ~/.cvflow/cluster.env; set +a;")
        assert 0 <= settings < command.index("ray start"), command


def test_dashboard_listens_on_head_loopback(aws_cluster: dict[str, Any]) -> None:
    (head_start,) = [c for c in aws_cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start
    assert re.findall(r"--dashboard-host[= ](\S+)", head_start) == ["127.0.0.1"]
    for command in start_commands(aws_cluster) + aws_cluster["setup_commands"]:
        assert "0.0.0.0" not in command


def test_token_and_credentials_are_copied_never_written(aws_cluster: dict[str, Any]) -> None:
    mounts = aws_cluster["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["~/.cvflow/cluster.env"] == "~/.cvflow/cluster.env"
    assert "RAY_AUTH_TOKEN" not in AWS_CLUSTER.read_text()  # neither a value nor a variable
    commands = [
        *aws_cluster.get("initialization_commands", []),
        *aws_cluster["setup_commands"],
        *aws_cluster["head_setup_commands"],
        *aws_cluster["worker_setup_commands"],
        *start_commands(aws_cluster),
    ]
    for command in commands:
        assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=", command), command
    for option in aws_cluster["docker"].get("run_options", []):
        assert not re.match(r"(-e|--env)\b", option), option  # no variables handed to docker run


def test_head_offers_no_cpu_and_gpu_workers_scale_from_zero(aws_cluster: dict[str, Any]) -> None:
    types = aws_cluster["available_node_types"]
    head = types[aws_cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != aws_cluster["head_node_type"]}
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus[0] >= 1 and 1 in gpus and max(gpus) > 1, "a 1-GPU and a multi-GPU worker type"
    for t in workers.values():
        assert t["min_workers"] == 0
        assert 0 < t["max_workers"] <= aws_cluster["max_workers"]


def test_nodes_get_s3_access_from_instance_profiles(aws_cluster: dict[str, Any]) -> None:
    arn = re.compile(r"^arn:aws:iam::<ACCOUNT_ID>:instance-profile/[\w+=,.@-]+$")
    for name, node_type in aws_cluster["available_node_types"].items():
        assert arn.match(node_type["node_config"]["IamInstanceProfile"]["Arn"]), name


def test_setup_installs_the_pinned_stack(aws_cluster: dict[str, Any]) -> None:
    pins = pinned_versions()
    setup = " ; ".join(aws_cluster["setup_commands"])
    assert f"torch=={pins['torch']}" in setup and f"torchvision=={pins['torchvision']}" in setup
    assert "pip install" in setup and "-e ~/cvflow" in setup
    assert aws_cluster["file_mounts"]["~/cvflow"] == "."
    assert aws_cluster["docker"]["image"] == f"rayproject/ray:{pins['ray']}-py311-gpu"


# --- infra/kuberay/ ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay_schema() -> dict[str, Any]:
    return json.loads(KUBERAY_SCHEMA.read_text())


def kuberay_validator(schema: dict[str, Any], kind: str) -> jsonschema.Draft202012Validator:
    """A validator for one kind (``RayCluster``/``RayJob``), so errors name the failing field."""
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"})


def all_validators(errors: Iterator[jsonschema.ValidationError]) -> set[str]:
    """The JSON Schema keywords that failed, including inside anyOf/oneOf."""
    found = set()
    for error in errors:
        found.add(error.validator)
        found |= all_validators(iter(error.context or []))
    return found


# The cluster specs of both manifests: the RayCluster's and the one inside the RayJob.
CLUSTER_SPECS = [
    pytest.param(load_yaml(RAYCLUSTER)["spec"], id="raycluster"),
    pytest.param(load_yaml(RAYJOB)["spec"]["rayClusterSpec"], id="rayjob"),
]


def containers(cluster_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def test_kuberay_schema_is_a_valid_json_schema(kuberay_schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(kuberay_schema)


@pytest.mark.parametrize(
    ("path", "kind"), [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["raycluster", "rayjob"]
)
def test_manifest_matches_kuberay_schema(kuberay_schema: dict[str, Any], path: Path, kind: str) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1  # one resource per file, no Secret riding along
    manifest = documents[0]
    assert manifest["kind"] == kind
    errors = sorted(kuberay_validator(kuberay_schema, kind).iter_errors(manifest), key=str)
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors] == []


def _head(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["headGroupSpec"]


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _both_value_and_source(doc: dict[str, Any]) -> None:
    env = _head(doc)["template"]["spec"]["containers"][0]["env"]
    var = next(v for v in env if "valueFrom" in v)
    var["value"] = "literal"


# (manifest, what is broken, the change, the JSON Schema keyword expected to fail)
BROKEN: list[tuple[Path, str, Callable[[dict[str, Any]], None], str]] = [
    (
        RAYCLUSTER,
        "misspelled spec field",
        lambda d: _rename(d["spec"], "workerGroupSpecs", "workerGroupSpec"),
        "additionalProperties",
    ),
    (
        RAYCLUSTER,
        "misspelled head field",
        lambda d: _rename(_head(d), "rayStartParams", "rayStartParam"),
        "additionalProperties",
    ),
    (
        RAYCLUSTER,
        "misspelled container field",
        lambda d: _rename(_head(d)["template"]["spec"]["containers"][0], "imagePullPolicy", "imagePullPolicyy"),
        "additionalProperties",
    ),
    (
        RAYCLUSTER,
        "misspelled pod field",
        lambda d: _rename(_gpu_group(d)["template"]["spec"], "serviceAccountName", "serviceAcountName"),
        "additionalProperties",
    ),
    (
        RAYCLUSTER,
        "misspelled env source",
        lambda d: _rename(
            _head(d)["template"]["spec"]["containers"][0]["env"][1]["valueFrom"], "secretKeyRef", "secretKeyRefs"
        ),
        "additionalProperties",
    ),
    (RAYCLUSTER, "integer rayStartParams value", lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "type"),
    (RAYCLUSTER, "string maxReplicas", lambda d: _gpu_group(d).update(maxReplicas="8"), "type"),
    (
        RAYCLUSTER,
        "quantity that is no quantity",
        lambda d: _gpu_group(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": "one"}
        ),
        "anyOf",
    ),
    (RAYCLUSTER, "unknown auth mode", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "enum"),
    (RAYCLUSTER, "env with value and valueFrom", _both_value_and_source, "not"),
    (RAYCLUSTER, "no headGroupSpec", lambda d: d["spec"].pop("headGroupSpec"), "required"),
    (RAYCLUSTER, "worker group without groupName", lambda d: _gpu_group(d).pop("groupName"), "required"),
    (
        RAYCLUSTER,
        "container without name",
        lambda d: _head(d)["template"]["spec"]["containers"][0].pop("name"),
        "required",
    ),
    (
        RAYJOB,
        "misspelled job field",
        lambda d: _rename(d["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "additionalProperties",
    ),
    (RAYJOB, "string boolean", lambda d: d["spec"].update(shutdownAfterJobFinishes="true"), "type"),
    (RAYJOB, "negative ttl", lambda d: d["spec"].update(ttlSecondsAfterFinished=-1), "minimum"),
    (RAYJOB, "unknown submission mode", lambda d: d["spec"].update(submissionMode="K8sMode"), "enum"),
    (
        RAYJOB,
        "string containerPort",
        lambda d: _head(d)["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="6379"),
        "type",
    ),
    (RAYJOB, "wrong kind", lambda d: d.update(kind="RayJobs"), "const"),
    (RAYJOB, "neither a cluster spec nor a selector", lambda d: d["spec"].pop("rayClusterSpec"), "anyOf"),
]


@pytest.mark.parametrize(
    ("path", "change", "expected"), [(p, c, e) for p, _, c, e in BROKEN], ids=[b[1] for b in BROKEN]
)
def test_kuberay_schema_rejects_broken_copies(
    kuberay_schema: dict[str, Any], path: Path, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(load_yaml(path))
    change(broken)
    failed = all_validators(kuberay_validator(kuberay_schema, load_yaml(path)["kind"]).iter_errors(broken))
    assert expected in failed, failed


@pytest.mark.parametrize("spec", CLUSTER_SPECS)
def test_kuberay_token_auth_and_head(spec: dict[str, Any]) -> None:
    assert spec["authOptions"]["mode"] == "token"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"]  # explicit; reachable in the pod network only:
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress") is not True


@pytest.mark.parametrize("spec", CLUSTER_SPECS)
def test_kuberay_workers_autoscale_with_gpus(spec: dict[str, Any]) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
        gpu_groups += any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)
    assert gpu_groups >= 1


PIPELINE_ENV = {"CVFLOW_STORAGE_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|USERNAME|_URI$|ENDPOINT|STORAGE_PATH")


@pytest.mark.parametrize("spec", CLUSTER_SPECS)
def test_kuberay_credentials_come_from_the_secret(spec: dict[str, Any]) -> None:
    for container in containers(spec):
        env = {var["name"]: var for var in container.get("env", [])}
        assert env.keys() >= PIPELINE_ENV, container["name"]
        assert "RAY_AUTH_TOKEN" not in env  # the operator injects it from its Secret
        for var_name, var in env.items():
            if SENSITIVE.search(var_name):
                assert "value" not in var, var_name
                assert var["valueFrom"]["secretKeyRef"]["name"] == "cvflow-credentials", var_name


def test_rayjob_runs_the_pipeline_runner_and_cleans_up() -> None:
    spec = load_yaml(RAYJOB)["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["python", "/home/ray/cvflow/pipelines/repro.py"]
    assert entrypoint[2:] == ["--cd", "/home/ray/cvflow"]
    assert not set("&;|<>`$") & set(spec["entrypoint"]), "one command, no shell syntax"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


# --- infra/iam/ ----------------------------------------------------------------------------

BUCKET_ARN = "arn:aws:s3:::<BUCKET>"
OBJECT_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}
WRITE_ACTIONS = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
# policy file -> (prefixes it may read and list, prefixes it may write)
IAM_ACCESS = {
    "ray-node-s3.json": ({"ray", "dvc"}, {"ray"}),
    "mlflow-server-s3.json": ({"mlflow"}, {"mlflow"}),
    "dvc-data-s3.json": ({"dvc"}, {"dvc"}),
}


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def policy_problems(policy: dict[str, Any]) -> list[str]:
    """What makes ``policy`` more than a least-privilege S3 policy on the placeholder bucket."""
    problems = []
    if policy.get("Version") != "2012-10-17":
        problems.append("Version must be 2012-10-17")
    statements = policy.get("Statement")
    if not isinstance(statements, list) or not statements:
        return [*problems, "Statement must be a non-empty list"]
    for i, st in enumerate(statements):
        where = st.get("Sid", f"statement {i}")
        if extra := set(st) - {"Sid", "Effect", "Action", "Resource", "Condition"}:
            problems.append(f"{where}: unexpected keys {sorted(extra)} (no NotAction/NotResource/Principal)")
        if st.get("Effect") != "Allow":
            problems.append(f"{where}: Effect must be Allow")
        actions = as_list(st.get("Action", []))
        resources = as_list(st.get("Resource", []))
        for action in actions:
            if not action.startswith("s3:") or "*" in action:
                problems.append(f"{where}: action {action!r} is not one named S3 action")
        for resource in resources:
            if resource != BUCKET_ARN and not re.fullmatch(re.escape(BUCKET_ARN) + r"/[a-z0-9-]+/\*", resource):
                problems.append(f"{where}: resource {resource!r} is neither the bucket nor one prefix in it")
        if resources == [BUCKET_ARN]:
            if actions != ["s3:ListBucket"]:
                problems.append(f"{where}: only s3:ListBucket on the bucket itself")
            prefixes = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
            if not prefixes:
                problems.append(f"{where}: s3:ListBucket without an s3:prefix condition")
        elif set(actions) - OBJECT_ACTIONS:
            problems.append(f"{where}: {sorted(set(actions) - OBJECT_ACTIONS)} on objects")
    return problems


def prefix_access(policy: dict[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """(listable, readable, writable) top-level prefixes of the bucket."""
    listed, read, written = set(), set(), set()
    for st in policy["Statement"]:
        for resource in as_list(st["Resource"]):
            if resource == BUCKET_ARN:
                listed |= {p.split("/")[0] for p in as_list(st["Condition"]["StringLike"]["s3:prefix"])}
                continue
            prefix = resource.removeprefix(BUCKET_ARN + "/").split("/")[0]
            if "s3:GetObject" in as_list(st["Action"]):
                read.add(prefix)
            if WRITE_ACTIONS & set(as_list(st["Action"])):
                written.add(prefix)
    return listed, read, written


def test_iam_has_one_policy_per_principal() -> None:
    assert {p.name for p in IAM.glob("*.json")} == set(IAM_ACCESS)


@pytest.mark.parametrize("name", sorted(IAM_ACCESS))
def test_iam_policy_is_least_privilege_s3(name: str) -> None:
    policy = json.loads((IAM / name).read_text())
    assert policy_problems(policy) == []
    readable, writable = IAM_ACCESS[name]
    listed, read, written = prefix_access(policy)
    assert (listed, read, written) == (readable, readable, writable)


@pytest.mark.parametrize("name", sorted(IAM_ACCESS))
def test_iam_policy_is_valid_policy_grammar(name: str) -> None:
    """moto's implementation of IAM's own policy-document checks (a dev dependency)."""
    validation = pytest.importorskip("moto.iam.policy_validation")
    validation.IAMPolicyDocumentValidator((IAM / name).read_text()).validate()


def test_iam_checker_rejects_wide_policies() -> None:
    wide = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": BUCKET_ARN},
            {"Effect": "Allow", "Action": ["ec2:RunInstances"], "Resource": BUCKET_ARN + "/ray/*"},
            {"Effect": "Allow", "NotAction": "s3:GetObject", "Resource": "arn:aws:s3:::other-bucket/*"},
        ],
    }
    problems = "\n".join(policy_problems(wide))
    for expected in ["'s3:*'", "'*'", "without an s3:prefix", "'ec2:RunInstances'", "NotAction", "other-bucket"]:
        assert expected in problems


# --- infra/mlflow/ -------------------------------------------------------------------------

# The compose-spec schema ships with Docker Compose, not with any package in the virtualenv, so
# the file is checked against the keys compose knows for what it uses: a misspelled key fails.
COMPOSE_SUBSET_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["services"],
    "properties": {
        "name": {"type": "string"},
        "services": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    **{k: {} for k in ["build", "command", "entrypoint", "healthcheck", "depends_on", "networks"]},
                    "image": {"type": "string"},
                    "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
                    "environment": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                    },
                    "ports": {"type": "array", "items": {"type": "string"}},
                    "volumes": {"type": "array", "items": {"type": "string"}},
                    **{k: {} for k in ["env_file", "user", "working_dir", "read_only", "secrets", "configs"]},
                },
            },
        },
        "volumes": {"type": "object"},
        "networks": {"type": "object"},
        "secrets": {"type": "object"},
        "configs": {"type": "object"},
    },
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_structure(compose: dict[str, Any]) -> None:
    jsonschema.validate(compose, COMPOSE_SUBSET_SCHEMA)
    assert set(compose["services"]) == {"postgres", "mlflow"}
    mlflow = compose["services"]["mlflow"]
    assert mlflow["build"] in (".", {"context": "."}) and SERVE_SH.is_file()
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_passwords_are_required_variables(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    references = re.findall(r"\$\{(\w*PASSWORD\w*)(\S{0,2})", text)
    assert references, "the passwords come from variables"
    for name, operator in references:
        assert operator.startswith(":?"), f"${{{name}}} must be ${{{name}:?message}}: no default, no empty value"
    for service in compose["services"].values():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(value)), key


def test_compose_publishes_on_loopback_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "ports" not in services["postgres"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    for service in services.values():
        assert "network_mode" not in service
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_compose_gives_serve_sh_its_interface(compose: dict[str, Any]) -> None:
    env = compose["services"]["mlflow"]["environment"]
    required_by_serve_sh = set(re.findall(r"^need (\w+)", SERVE_SH.read_text(), flags=re.MULTILINE))
    assert required_by_serve_sh and required_by_serve_sh <= env.keys()
    assert env["MLFLOW_HOST"] == "0.0.0.0"  # inside the container; published on 127.0.0.1 above
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("${MLFLOW_ARTIFACTS_DESTINATION:?")
    volumes = compose["services"]["postgres"]["volumes"]
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in volumes
    sql = " ".join(p.read_text() for p in INITDB.glob("*.sql"))
    assert re.search(r"CREATE DATABASE mlflow_auth\b", sql)


def test_mlflow_image_is_pinned() -> None:
    text = DOCKERFILE.read_text()
    pins = pinned_versions()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, flags=re.MULTILINE)
    (install,) = re.findall(r"^RUN pip install (.+)$", text, flags=re.MULTILINE)
    requirements = [r.strip("\"'") for r in install.split()]
    assert all("==" in r for r in requirements), requirements
    assert f"mlflow[auth]=={pins['mlflow']}" in requirements
    assert f"boto3=={pins['boto3']}" in requirements
    assert any(r.startswith("psycopg2-binary==") for r in requirements)
    assert re.search(r"^COPY .*serve\.sh ", text, flags=re.MULTILINE)
    assert re.search(r"^CMD \[", text, flags=re.MULTILINE)
    assert not re.search(r"^(ENV|ARG)\b.*PASSWORD", text, flags=re.MULTILINE)
