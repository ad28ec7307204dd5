"""deftx_engine.hub.secrets.scrub: hides secrets (given ones, Hub-token shapes, credential values), not words."""
from deftx_engine.hub.secrets import scrub

TOKEN = "hf_TopSecretToken0123456789abcdefXYZ"


def test_messages_without_secrets_are_unchanged():
    for text in ("pushing needs a Hugging Face token: paste one (write access) in the token field, sign in, or set "
                 "the HF_TOKEN environment variable",
                 "pushing needs a Hugging Face token: set HF_TOKEN or pass --token",
                 "hf_hub_download failed: token= missing", "uses a bearer token", "Token: expired"):
        assert scrub(text) == text


def test_secrets_are_hidden():
    plain = "my-plain-secret-4242"  # no hf_ shape: only the exact match catches it
    cases = {f"401 for url (token={TOKEN})": "401 for url (token=hf_***)",
             f"Authorization: Bearer {TOKEN}": "Authorization: Bearer hf_***",
             "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig": "Authorization: Bearer ***",
             "HF_TOKEN=abcd1234efgh": "HF_TOKEN=***", "token: 0123456789abcdefghijklmnopq": "token: ***",
             "api_org_0123456789abcdefghijKLMN": "api_org_***", f"boom {plain}!": "boom ***!"}
    for text, shown in cases.items():
        assert scrub(text, plain) == shown, text


def test_short_or_empty_secrets_are_not_replaced_everywhere():
    assert scrub("a token: paste one", "", None, "a") == "a token: paste one"
