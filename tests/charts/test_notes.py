"""templates/NOTES.txt: what to run next."""

from __future__ import annotations


def test_should_print_the_submit_command_when_defaults_are_used(render):
    notes = render().notes
    assert "dfk8s submit --pipeline caption" in notes
    assert "--namespace batch --service-account demo-dfk8s-reducer" in notes
    assert "ConfigMap demo-dfk8s-jobs" in notes
    assert "--s3-endpoint" not in notes and "--api-url" not in notes and "--api-key-secret" not in notes


def test_should_point_at_the_in_cluster_services_when_seaweedfs_and_fake_api_are_enabled(render):
    notes = render({"seaweedfs": {"enabled": True}, "fakeApi": {"enabled": True, "port": 9000}}).notes
    assert "--s3-endpoint http://demo-dfk8s-seaweedfs.batch.svc:8333" in notes
    assert "--api-url http://demo-dfk8s-fake-api.batch.svc:9000/v1" in notes


def test_should_reference_only_the_stored_keys_when_secret_create_is_set(render):
    notes = render({"secret": {"create": True, "awsAccessKeyId": "a", "awsSecretAccessKey": "b"}}).notes
    assert "--s3-secret demo-dfk8s-credentials" in notes
    assert "--api-key-secret" not in notes and "--hf-token-secret" not in notes


def test_should_use_the_custom_name_when_reducer_service_account_name_is_set(render):
    notes = render({"reducer": {"serviceAccount": {"name": "runner"}}}).notes
    assert "--service-account runner" in notes
