"""docker/ holds files no test here can run (no docker daemon, no Kubernetes): their entrypoint
is what the multi-node tests start nodes with, and this checks that the rest agrees with it and
with the code: every role a container runs exists, every CURATE_* variable is one the code or
the entrypoint reads, ports and volumes line up, and the example job spec is a valid job."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from curate.settings import Settings
from pipelines.recipes import load_recipe, merge
from schemas.job import parse_job_spec
from services.api.settings import ServiceSettings
from services.cli.main import build_parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ENTRYPOINT = (DOCKER / "entrypoint.sh").read_text()
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
KUBERAY = list(yaml.safe_load_all((DOCKER / "kuberay.yaml").read_text()))
IMAGES = {"lvd-curate:cpu": "Dockerfile", "lvd-curate:cuda": "Dockerfile.cuda"}


def roles() -> set[str]:
    return set(re.findall(r"^  (\w+)\)$", ENTRYPOINT, re.MULTILINE))


def known_variables() -> set[str]:
    """The CURATE_* names something reads: a setting of the machine or of the service (nested
    ones as CURATE_X__Y), or a variable of the entrypoint itself."""
    names = {f"CURATE_{name.upper()}" for name in Settings.model_fields}
    names |= {f"CURATE_{name.upper()}" for name in ServiceSettings.model_fields}
    return names | set(re.findall(r"\$\{?(CURATE_\w+)", ENTRYPOINT))


def curate_nodes() -> dict[str, dict]:
    return {n: s for n, s in COMPOSE["services"].items() if s.get("image") in IMAGES}


def test_the_entrypoint_has_every_role_the_docs_name():
    assert roles() == {"head", "worker", "api", "curate"}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES.values()))
def test_each_image_runs_the_entrypoint(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    copied = re.search(r"^COPY docker/entrypoint\.sh (\S+)$", text, re.MULTILINE)
    assert copied, f"{dockerfile} does not install docker/entrypoint.sh"
    assert f'ENTRYPOINT ["{copied.group(1)}"]' in text
    default = re.search(r'^CMD \["(\w+)"\]$', text, re.MULTILINE)
    assert default and default.group(1) in roles()
    for folder in ("curate", "pipelines", "schemas", "services"):
        assert f"COPY {folder} ./{folder}" in text
    # Every mount point the deployments use exists in the image, owned by its user.
    assert "mkdir -p /data /catalog" in text and "chown curate /data /catalog" in text


def test_compose_runs_every_node_through_a_role_with_known_variables():
    nodes = curate_nodes()
    assert {"head", "cpu-worker", "gpu-worker", "api"} <= set(nodes)
    known = known_variables()
    for name, service in nodes.items():
        assert service["command"][0] in roles(), name
        env = service["environment"]
        unknown = {v for v in env if v.startswith("CURATE_")} - known
        assert not unknown, (name, unknown)
        assert service["build"]["dockerfile"] == f"docker/{IMAGES[service['image']]}"
    assert nodes["head"]["environment"]["CURATE_NODE_CPUS"] == "0"
    assert nodes["api"]["environment"]["CURATE_RAY_ADDRESS"] == "http://head:8265"
    assert "8265:8265" in nodes["head"]["ports"][0]


def test_compose_shards_go_to_its_object_store_and_the_catalog_to_a_shared_volume():
    nodes = curate_nodes()
    volumes = set(COMPOSE["volumes"])
    for name, service in nodes.items():
        env = service["environment"]
        # The bucket the store-init service creates, on the store service's endpoint.
        assert env["CURATE_DATA_ROOT"].startswith("s3://lvd/"), name
        assert env["AWS_ENDPOINT_URL"] == "http://store:9000", name
        for volume in service["volumes"]:
            assert volume.split(":")[0] in volumes, (name, volume)
    catalog = Path(nodes["api"]["environment"]["CURATE_CATALOG_PATH"]).parent
    for name in ("head", "api"):  # drivers run on the head; the service reads the same file
        assert f"catalog:{catalog}" in nodes[name]["volumes"], name
    assert "mc mb -p store/lvd" in COMPOSE["services"]["store-init"]["command"][0]
    sources = nodes["api"]["environment"]["CURATE_SOURCE_ROOTS"]
    assert all(any(v.split(":")[1] == sources for v in s["volumes"]) for s in nodes.values())


def test_compose_publishes_the_port_the_api_role_listens_on():
    default = re.search(r"CURATE_API_PORT:-(\d+)", ENTRYPOINT).group(1)
    published = curate_nodes()["api"]["ports"][0]
    assert published.endswith(f":{default}")


def _kind(kind: str) -> list[dict]:
    return [doc for doc in KUBERAY if doc["kind"] == kind]


def test_kuberay_uses_the_images_variables_and_roles_of_the_project():
    known = known_variables()
    (config,) = [d for d in _kind("ConfigMap") if d["metadata"]["name"] == "lvd-curate"]
    assert not {v for v in config["data"] if v.startswith("CURATE_")} - known
    assert config["data"]["CURATE_DATA_ROOT"].startswith("s3://")
    (cluster,) = _kind("RayCluster")
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    (api,) = _kind("Deployment")
    pods.append(api["spec"]["template"]["spec"])
    for pod in pods:
        for container in pod["containers"]:
            assert container["image"] in IMAGES
            assert {"configMapRef": {"name": "lvd-curate"}} in container["envFrom"]
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])}
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] in roles()
    env = {e["name"] for e in container["env"]}
    assert not {v for v in env if v.startswith("CURATE_")} - known
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    catalog = str(Path(config["data"]["CURATE_CATALOG_PATH"]).parent)
    for mounts in (head["volumeMounts"], container["volumeMounts"]):
        assert {"name": "catalog", "mountPath": catalog} in mounts


def test_the_kuberay_job_is_a_valid_curate_command_and_spec():
    (job,) = _kind("RayJob")
    assert (
        job["spec"]["clusterSelector"]["ray.io/cluster"]
        == _kind("RayCluster")[0]["metadata"]["name"]
    )
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "curate"
    args = build_parser().parse_args(argv[1:])
    (specs,) = [d for d in _kind("ConfigMap") if d["metadata"]["name"] == "lvd-curate-specs"]
    mount = "/specs/"
    assert args.spec_file.startswith(mount)
    fields = yaml.safe_load(specs["data"][args.spec_file[len(mount) :]])
    spec = parse_job_spec(merge(load_recipe(args.recipe), fields))
    assert spec.job_id == "crawl1"
