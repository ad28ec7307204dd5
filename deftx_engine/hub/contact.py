"""How DeFT-X meets the Hugging Face Hub: whether it can be reached now (answered at once, not after the
client's retries), its failures in words a user can act on, and the tags a pushed vector's card carries so the
gallery lists it. Torch-free: the gallery, the pushes and the model loader all ask it.
"""
from __future__ import annotations

import os
import socket
from typing import Iterable
from urllib.parse import urlsplit

GALLERY_TAG = "deftx"  # every vector hub.push_vector uploads carries it
KIND_TAG = "deftx-kind-"  # + language | task: the Hub's list filter can select a kind
LANGUAGE_TAG = "deftx-lang-"  # + each language code
HUB_TIMEOUT = 5.0  # seconds the gallery waits for the Hub before it answers from the catalogue
OFFLINE = "offline mode: HF_HUB_OFFLINE is set"  # hub_unavailable's reason in offline mode


def pushed_tags(kind: str, languages: Iterable[str]) -> list[str]:
    """The tags a pushed vector's card carries for the gallery: ``deftx``, its kind, each language code."""
    return [GALLERY_TAG, f"{KIND_TAG}{kind}", *(f"{LANGUAGE_TAG}{code}" for code in languages if code)]


def _unreachable(endpoint: str, timeout: float) -> str:
    """Why a TCP connection to ``endpoint`` fails ("" if it opens): the Hub client retries a failed name
    lookup or refused connection for ~30 s, this says so at once. Behind a proxy it cannot tell: ""."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return ""
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {url.netloc}: {e.strerror or e}"
    return ""


def hub_unavailable(timeout: float = HUB_TIMEOUT) -> str:
    """Why the Hub cannot be used now ("" when a connection to it opens): offline mode, or an endpoint that
    refuses connections or has no address. Answers at once, without the client's retries."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return OFFLINE
    return _unreachable(constants.ENDPOINT, timeout)


def model_unavailable(repo_id: str, *, ask_hub: bool = False) -> str:
    """Why the Hub model ``repo_id`` cannot be loaded now, in words for a user ("" when it can): it is in the local
    model cache, or the Hub can be reached (``ask_hub``: and says it has the model). Why: ``from_pretrained``
    retries an unreachable Hub five times with back-off (~25-40 s) before an error that names no cure; the
    model loader and the app ask this first and answer at once."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return ""
    except ValueError:  # not a valid repo id: from_pretrained says so in its own words
        return ""
    why = hub_unavailable()
    if why:
        return f"it is not in the local model cache and {hub_off_words(why)}"
    if ask_hub:
        try:  # a new client reads the endpoint now (the module-level one kept the one it was imported with)
            HfApi().model_info(repo_id, timeout=2 * HUB_TIMEOUT)
        except RepositoryNotFoundError:
            return "the Hugging Face Hub has no such model (or it is private)"
        except Exception as e:  # noqa: BLE001 -- DNS, proxy, timeout, HTTP 5xx: all mean "cannot be reached"
            return hub_error_words(e) or "the Hugging Face Hub did not answer for it, and it is not in the local cache"
    return ""


def hub_off_words(why: str) -> str:
    """The Hub being off or out of reach (``why``: ``hub_unavailable``'s reason), in words for a user."""
    from huggingface_hub import constants

    if why == OFFLINE:
        return "the Hugging Face Hub is switched off on this server (HF_HUB_OFFLINE is set)"
    return f"the Hugging Face Hub at {urlsplit(constants.ENDPOINT).netloc} cannot be reached from this server ({why})"


def hub_error_words(exc: BaseException) -> str:
    """A failed Hub call in words a user can act on, never the client's text (which names its own settings and
    URLs); "" for a failure these words do not cover (the caller shows its first line)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled) or (isinstance(exc, LocalEntryNotFoundError)
                                                 and constants.is_offline_mode()):
        return hub_off_words(OFFLINE)
    # the client's transport errors (its own httpx), a download that found neither the Hub nor a cached copy
    transport = {"TransportError", "TimeoutException"} & {c.__name__ for c in type(exc).__mro__}
    if transport or isinstance(exc, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return hub_off_words(_unreachable(constants.ENDPOINT, 2.0) or "no answer")
    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its conditions on the Hub, then give a token of that account"
    if isinstance(exc, RepositoryNotFoundError):
        return "the Hub has no such repository, or it is private and the token given (if any) has no access to it"
    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    if status in (401, 403):
        return (f"the Hub refused the token (HTTP {status}): a push needs a token with write access to the "
                "repository's owner")
    if isinstance(status, int) and status >= 500:
        return f"the Hub answered with a server error (HTTP {status}); try again later"
    return ""
