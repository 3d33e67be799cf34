import base64

from orchestrator.httpauth import basic_auth


def test_basic_auth_is_basic_and_the_base64_of_user_colon_password() -> None:
    assert basic_auth("admin", "s3cret:pw") == "Basic YWRtaW46czNjcmV0OnB3"
    value = basic_auth("ünï", "pässwörd")
    assert value.startswith("Basic ")
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == "ünï:pässwörd"
