"""Models from the Hugging Face Hub that are not the base model (the scorer's embedding models, the captioner):
fetched only when asked, with one sentence saying why when they cannot be (offline, gated, misspelt), and loaded from
a local folder just as well. models.py's base-model loading shares the sentences through `hub_file`."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def hub_file(repo_id: str, filename: str, *, token: str | None = None, local_files_only: bool | None = None,
             missing: str, instead: str, error: type[UserError] = UserError) -> Path:
    """One small file of a Hub repository (downloaded, or from the cache), or `error` saying why not: `missing` is the
    sentence for a repository without that file, `instead` what the user can do when the Hub cannot be reached."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, token=token, local_files_only=bool(local_files_only)))
    except hf_errors.GatedRepoError as err:
        raise error(f"{repo_id} is gated: accept its licence on its Hugging Face page, then set HF_TOKEN (or add it to Colab's secrets).") from err
    except hf_errors.RepositoryNotFoundError as err:
        raise error(f"There is no model {repo_id!r} on the Hugging Face Hub, or it is private; check the spelling, or set HF_TOKEN if it is yours.") from err
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as err:  # before EntryNotFoundError: a subclass
        raise error(f"Cannot download {repo_id} (no connection to the Hugging Face Hub) and it is not in the local cache; connect to the internet, or {instead}.") from err
    except hf_errors.EntryNotFoundError as err:
        raise error(missing) from err
    except OSError as err:  # connection errors that huggingface_hub did not wrap
        raise error(f"Cannot download {repo_id} ({short(err)}); check the internet connection, or {instead}.") from err


def load_pretrained(cls, source: str | os.PathLike, *, what: str, instead: str, **kwargs):
    """`cls.from_pretrained(source)` for a transformers model or processor, from a local folder or a Hub id; a Hub id's
    config.json is fetched first, so offline, gated and misspelt ids fail in one sentence before any weights move."""
    where = Path(source)
    if not where.is_dir():
        hub_file(str(source), "config.json", missing=f"{source} on the Hugging Face Hub is not a transformers model (no config.json); give {what}'s id or folder.",
                 instead=instead)
    try:
        return cls.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{source} could not be loaded as {what} ({short(err)}); check that it is complete and of that kind, or {instead}.") from err


def short(err: BaseException) -> str:
    """An exception's first line, at most 200 characters: enough to name the cause in a one-sentence error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
