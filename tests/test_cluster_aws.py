"""infra/cluster/aws.yaml through Ray's own checks for `ray up` (prepare_config merges the AWS
defaults, validate_config checks ray-schema.json and the node types), plus what advflow needs of
it: GPU workers for the recipe, token auth, the image the Dockerfile builds; and the SSM token
fetch its nodes run (against moto's SSM)."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from advflow.infra.cluster import names, ray_token
from advflow.infra.cluster.validate import ray_up_checks

AWS = names.CLUSTER_DIR / "aws.yaml"


@pytest.mark.integration  # end-to-end: Ray's own cluster-config validation (imports the autoscaler)
def test_aws_yaml_passes_rays_validation():
    prepared = ray_up_checks(yaml.safe_load(AWS.read_text()))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_aws_yaml_fits_the_recipe_and_authenticates():
    from advflow.platform.config import load_config

    config = yaml.safe_load(AWS.read_text())
    d = load_config(names.REPO / "jobs/configs/imagenet_xl2_1nfe.yaml").distributed
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"  # 8 GPUs, 96 vCPUs per node
    assert d.workers <= 8 and d.workers * d.cpus_per_worker <= 96
    assert "--shm-size=96g" in config["docker"]["worker_run_options"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert any("advflow.infra.cluster.ray_token" in c for c in config["setup_commands"])
    # MLflow's password: fetched into a 0600 file, named to every process `ray start` spawns.
    fetch = [c for c in config["setup_commands"] if "--mlflow-user" in c]
    assert len(fetch) == 1 and "--out ~/.advflow/mlflow_credentials" in fetch[0]
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ray_start = [c for c in start if "ray start" in c]
        assert ray_start and all(
            c.startswith("ADVFLOW_MLFLOW_CREDENTIALS_FILE=$HOME/.advflow/mlflow_credentials ray start") for c in ray_start)
    assert "MLFLOW_TRACKING_PASSWORD" not in AWS.read_text()
    assert config["docker"]["image"].endswith("/advflow:0.1.0")
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_worker=2),                                          # misspelled top-level key
    lambda c: c["available_node_types"]["gpu"].update(max_workers="two"),
    lambda c: c.update(head_node_type="gpu_head"),                             # names no node type
    lambda c: c["provider"].pop("type"),
], ids=["unknown-key", "bad-type", "unknown-head", "no-provider-type"])
def test_a_broken_launcher_config_is_refused(mutate):
    config = yaml.safe_load(AWS.read_text())
    mutate(config)
    with pytest.raises(Exception):
        ray_up_checks(config)


@pytest.mark.integration
def test_the_token_lands_in_rays_default_path_readable_only_by_its_user(tmp_path, s3_env):
    # moto's server (conftest), reached through AWS_ENDPOINT_URL as the nodes reach AWS. Never
    # moto.mock_aws() here: leaving it resets moto's in-process backends, which the session's
    # server shares, and every later S3 test would find its bucket gone.
    import boto3

    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=s3_env)
    ssm.put_parameter(Name="/advflow/ray-auth-token", Value="tok-123\n", Type="SecureString",
                      Overwrite=True)
    out = tmp_path / ".ray" / "auth_token"
    assert ray_token.main(["--parameter", "/advflow/ray-auth-token", "--out", str(out)]) == 0
    assert out.read_text() == "tok-123"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    ssm.put_parameter(Name="/advflow/empty", Value=" ", Type="SecureString", Overwrite=True)
    with pytest.raises(SystemExit, match="ray get-auth-token --generate"):
        ray_token.fetch("/advflow/empty", out, client=ssm)


@pytest.mark.integration
def test_mlflows_password_lands_in_a_0600_credentials_file_advflow_reads(tmp_path, s3_env):
    import boto3

    from advflow.platform.tracking.credentials import ensure_mlflow_credentials

    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=s3_env)
    ssm.put_parameter(Name="/advflow/mlflow-password", Value="pw-456\n", Type="SecureString", Overwrite=True)
    out = tmp_path / ".advflow" / "mlflow_credentials"
    argv = ["--parameter", "/advflow/mlflow-password", "--mlflow-user", "admin", "--out", str(out)]
    assert ray_token.main(argv) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    env = {"ADVFLOW_MLFLOW_CREDENTIALS_FILE": str(out)}
    assert ensure_mlflow_credentials(env)
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "pw-456")
    ssm.put_parameter(Name="/advflow/empty-pw", Value=" ", Type="SecureString", Overwrite=True)
    with pytest.raises(SystemExit, match="MLflow password of 'admin'"):
        ray_token.fetch_mlflow("/advflow/empty-pw", out, "admin", client=ssm)
