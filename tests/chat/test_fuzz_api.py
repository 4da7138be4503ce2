"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): no input gives a 5xx.

Runs against a tiny random-weight model so that thousands of generated requests stay quick.
"""

import dataclasses

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from llmsite.wsgi import application
from tests.factories import import_demo_resources, make_api_client, write_tiny_gguf

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf")


@pytest.fixture
def fuzz_setup(settings, tiny_model, db):
    models = tuple(dataclasses.replace(m, path=str(tiny_model), context_length=512) for m in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
    settings.API_RATE_LIMIT = ""
    settings.API_MAX_TOKENS = 32  # bigger asks get a quick 400; generation stays short
    import_demo_resources()
    return {"Authorization": f"Bearer {make_api_client('fuzzer', key_name='fuzz').raw_key}"}


@schema.parametrize()
@hypothesis_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.filter_too_much])
def test_no_generated_request_causes_a_server_error(case, fuzz_setup):
    case.call_and_validate(headers=fuzz_setup, checks=[not_a_server_error])
