"""What the module tells the user, in one place: status lines, tooltips, the consent question, progress and
errors. No message is given the server's token, so none can show it."""

from __future__ import annotations

from .client import AuthenticationError, LowDoseClient, LowDoseClientError, ModelInfo, Progress, server_key

DENOISE, FIDELITY = "denoise", "fidelity"  # the two kinds of request

CONNECTING = "Connecting..."
NOT_CONNECTED = "Not connected: press Connect."
NEEDS_VOLUME_AND_MODEL = "Choose a CT volume and connect to a server first."
CANCELLING = "Cancelling..."
CANCELLED = "Cancelled (the server may finish its current step, and discards it)."
INPUT_REMOVED = "The input volume was removed while the server worked."
ORIGINAL_REMOVED = "The original of this denoised volume is no longer in the scene."
FIDELITY_DONE = "Fidelity check done."
CONSENT_TITLE = "Send volume to lowdose server?"
_NEEDS_TOKEN = "the server needs its access token (Server token)."
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def connected(info: dict, models: list[ModelInfo]) -> str:
    """The status line after connecting: lowdose's version, the device, the models, the fidelity check."""
    lowdose = info.get("lowdose", {})
    fidelity = ", fidelity check" if LowDoseClient.has_fidelity(info) else ""
    return (
        f"Connected: lowdose {lowdose.get('version', '?')} on {lowdose.get('device', '?')}, "
        f"{len(models)} model(s){fidelity}."
    )


def not_connected(error: BaseException) -> str:
    """The status line after a failed connection (the message box says why)."""
    return "Not connected: " + _NEEDS_TOKEN if isinstance(error, AuthenticationError) else "Not connected."


def model_description(model: ModelInfo) -> str:
    """The model's description and, when its card has it, its validation PSNR on the abdomen."""
    psnr = (model.validation or {}).get("val_psnr_abdomen")
    figure = f" Validation PSNR (abdomen): {psnr:.2f} dB." if isinstance(psnr, (int, float)) else ""
    return model.description + figure


def model_label(model: ModelInfo) -> str:
    """The model menu's text: the model's name and version, marked when it uses the dose."""
    name = f"{model.model} {model.version}" if model.version else model.model
    return name + ("  (dose-aware)" if model.dose_aware else "")


def dose_tooltip(model: ModelInfo) -> str:
    if model.dose_aware:
        return "Dose of the scan as a fraction of a normal dose (auto: estimated from the image)."
    return "This model does not use the dose."


def steps_tooltip(model: ModelInfo) -> str:
    """What the sampling steps menu is for, with this model."""
    if model.sampling_steps is None:
        return "This model is not a diffusion model: it takes no sampling steps."
    return (
        "How many steps the diffusion model samples in: each step is one more pass of the network, so 1 is the "
        f"fastest; {model.sampling_steps}, marked, is the model's default."
    )


def ensemble_tooltip() -> str:
    """What the self-ensemble menu does, and what it costs."""
    return (
        "Self-ensemble: the server also denoises each slice flipped and turned (2, 4 or 8 ways) and averages the "
        "results, which removes a little more of the network's own errors (on test data +0.12 dB PSNR with 2, "
        "+0.18 dB with 4, +0.24 dB with 8). It takes 2, 4 or 8 times as long on the server. Off: the network "
        "alone, fastest."
    )


def consent_question(url: str) -> str:
    """The question asked before the first volume goes to a server; ValueError when ``url`` is no address."""
    key = server_key(url)
    local = key.split("://", 1)[1].rsplit(":", 1)[0] in _LOCAL_HOSTS
    where = (
        "a server on this computer"
        if local
        else "ANOTHER COMPUTER: make sure your institution allows sending patient images to it"
    )
    return (
        f"Allow sending CT volumes to {key}?\n\nThe volume's voxels and geometry are written to a file and "
        f"uploaded to {where}. No patient name or other DICOM header is sent. The server keeps no copy after "
        "answering (see its documentation).\n\nThis permission is remembered for this server until you "
        "untick 'Allow sending volumes to this server'."
    )


def request_started(kind: str) -> str:
    if kind == DENOISE:
        return "Sending the volume..."
    return "Sending the volume for the fidelity check (segmenting two scans takes minutes)..."


def request_failed(kind: str, error: BaseException) -> str:
    """The status line after a failed request (the message box says why)."""
    return f"The {kind} request failed" + (": " + _NEEDS_TOKEN if isinstance(error, AuthenticationError) else ".")


def progress(report: Progress) -> tuple[str, int | None]:
    """The status line and the progress bar's percent for a report; percent None while the server works (it
    does not say how far it is)."""
    if report.stage == "waiting":
        return f"The server is working... {report.elapsed_s:.0f} s", None
    text = report.describe()
    return text[:1].upper() + text[1:], int(100 * (report.fraction or 0.0))


def denoise_done(summary: dict, volume_name: str) -> str:
    """The status line after a denoised volume was loaded: the server's description (dose used and whether it
    was given or estimated, and how an estimate was read) and its time."""
    done = f"Done: {summary.get('description', volume_name)} in {summary.get('seconds') or 0:.1f} s on the server."
    if summary.get("dose_source") == "estimated" and summary.get("dose_detail"):
        done += f" The dose was {summary['dose_detail']}."
    return done


def error_text(what: str, error: BaseException) -> tuple[str, bool]:
    """The message box's text for an error, and whether it was foreseen (its message says it all); an error
    not foreseen also names its type and points to the log, where its details go."""
    if isinstance(error, (LowDoseClientError, ValueError, OSError)):
        return f"{what}:\n\n{error}", True
    return f"{what}:\n\n{type(error).__name__}: {error}\n\n(Details are in the log.)", False


def denoise_tooltip(have_input: bool, have_model: bool) -> str:
    """What the Denoise button does, or what it still needs."""
    if not have_input:
        return "Choose a CT volume."
    if not have_model:
        return "Connect to a lowdose server first."
    return "Send the volume to the server and load the denoised volume."
