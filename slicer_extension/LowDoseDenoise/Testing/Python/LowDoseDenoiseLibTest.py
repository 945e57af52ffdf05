"""Tests of LowDoseDenoiseLib that need neither a server nor Slicer's widgets: one test case per library module.

They run in Slicer's own Python (registered with slicer_add_python_unittest) and in the repository's CI
(tests/test_slicer_module.py runs this file with plain Python), so the library is checked on the Python
version Slicer ships. The full client is tested against the real server in tests/test_slicer_client.py.
"""

import gzip
import http.server
import json
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest
import zipfile
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent.parent
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from LowDoseDenoiseLib import client as lib  # noqa: E402
from LowDoseDenoiseLib import dose, ensemble, messages, results, settings, steps, strength  # noqa: E402
from LowDoseDenoiseLib.jobs import BackgroundJob, start_upload  # noqa: E402

TOKEN = "s3cret-token-value"
BAD_STEPS = (0, 5, -1, "2", True, 2.5, [2], "")  # what the client refuses before sending anything

INFO = {  # /info/ of a server with a diffusion model, a model that is not one, and one from before steps existed
    "name": "lowdose",
    "lowdose": {"version": "0.5.0"},
    "models": {
        "denoise_dose_diffusion": {
            "description": "DA-Diff.",
            "lowdose": {"task": "denoise", "model": "dose_diffusion", "dose_aware": True, "sampling_steps": 2},
        },
        "denoise_dose_unet": {"lowdose": {"task": "denoise", "model": "dose_unet", "sampling_steps": None}},
        "denoise_redcnn": {"lowdose": {"task": "denoise", "model": "redcnn"}},
        "fidelity": {"description": "fidelity check"},
    },
}

REPORT = {  # a fidelity report as the server writes it (fidelity.json), three structures
    "study": {"verdict": "changed", "summary": "1 of 2 structures changed"},
    "denoising": {"model": "dose_unet", "dose_fraction": 0.25},
    "structures": [
        {
            "label": 1,
            "name": "spleen",
            "verdict": "kept",
            "reasons": [],
            "images": {"original": {"hu_mean": 50.0, "hu_std": 30.0}, "denoised": {"hu_mean": 51.0, "hu_std": 9.0}},
            "pairs": {"denoised_vs_original": {"dice": 0.97}},
        },
        {
            "label": 2,
            "name": "kidney_right",
            "verdict": "changed",
            "reasons": ["Dice 0.60 < 0.80", "HU mean +60"],
            "images": {"original": {"hu_mean": 30.0, "hu_std": 25.0}, "denoised": {"hu_mean": 90.0, "hu_std": 8.0}},
            "pairs": {"denoised_vs_original": {"dice": 0.6}},
        },
        {"label": 5, "name": "brain", "verdict": "absent", "reasons": [], "images": {}, "pairs": {}},
    ],
}


def nifti_header(dims=(3, 8, 8, 4)) -> bytes:
    """A minimal NIfTI-1 header (348 bytes + 4 bytes extension flag) for a 3-D int16 volume."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, *(list(dims) + [1] * (8 - len(dims))))
    struct.pack_into("<h", header, 70, 4)  # datatype int16
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\x00"
    return bytes(header) + b"\x00\x00\x00\x00"


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A server that keeps the params JSON of each POST and answers with ``reply`` (status, type, body)."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        rest = body.partition(b'name="params"\r\n\r\n')[2]
        self.server.params.append(json.loads(rest.split(b"\r\n--", 1)[0]) if rest else None)
        status, content_type, answer = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def memory_store():
    """A ConsentStore/TokenStore backing (load, save) over a dict, and the dict."""
    memory = {}
    return memory, (lambda: memory.get("text")), (lambda text: memory.__setitem__("text", text))


class FolderTestCase(unittest.TestCase):
    def setUp(self):
        self.folder = Path(tempfile.mkdtemp(prefix="lowdose-libtest-"))

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)


class ClientTest(FolderTestCase):
    """client.py: what the client does without a server (files, answers, errors, the token)."""

    def test_volume_sniffing(self):
        nifti = self.folder / "a.nii"
        nifti.write_bytes(nifti_header() + bytes(8 * 8 * 4 * 2))
        self.assertEqual(lib.sniff_volume(nifti), "nifti")
        packed = self.folder / "a.nii.gz"
        packed.write_bytes(gzip.compress(nifti.read_bytes()))
        self.assertEqual(lib.sniff_volume(packed), "nifti")
        flat = self.folder / "flat.nii.gz"
        flat.write_bytes(gzip.compress(nifti_header(dims=(2, 8, 8)) + bytes(128)))
        self.assertIsNone(lib.sniff_volume(flat))  # 2-D: not a volume
        nrrd = self.folder / "a.nrrd"
        nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 4\nencoding: raw\n\n" + bytes(512))
        self.assertEqual(lib.sniff_volume(nrrd), "nrrd")
        for junk in (b"<html>no</html>", b"\x1f\x8b\x08garbage", b"PK\x03\x04zip", b""):
            path = self.folder / "junk.bin"
            path.write_bytes(junk)
            self.assertIsNone(lib.sniff_volume(path), junk)
        self.assertIsNone(lib.sniff_volume(self.folder / "missing.nii.gz"))

    def test_multipart_answer_is_split_on_disk(self):
        image = gzip.compress(nifti_header() + bytes(512))
        boundary = b"b0undary"
        body = (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="params"\r\n'
            b"Content-Type: application/json\r\n\r\n"
            + json.dumps({"dose_fraction": 0.25}).encode()
            + b"\r\n--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="image"; '
            b'filename="../../denoised.nii.gz"\r\n\r\n' + image + b"\r\n--" + boundary + b"--\r\n"
        )
        answer = self.folder / "answer.bin"
        answer.write_bytes(body)
        parts = lib._split_multipart(answer, boundary, self.folder)
        self.assertEqual(parts["params"], {"dose_fraction": 0.25})
        self.assertEqual(parts["image"], self.folder / "denoised.nii.gz")  # no path from the server is followed
        self.assertEqual(parts["image"].read_bytes(), image)
        answer.write_bytes(body[: len(body) // 2])
        with self.assertRaises(lib.ServerError):
            lib._split_multipart(answer, boundary, self.folder)

    def test_fidelity_zip_is_checked(self):
        archive = self.folder / "fidelity.zip"
        label = gzip.compress(nifti_header() + bytes(512))
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("fidelity/labels_original.nii.gz", label)
            z.writestr("fidelity/labels_denoised.nii.gz", label)
            z.writestr("fidelity/fidelity.html", "<html></html>")
        files = lib._extract_fidelity_zip(archive, self.folder / "out")
        self.assertEqual(set(files), {"labels_original", "labels_denoised", "html"})
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("fidelity/labels_original.nii.gz", label)
        with self.assertRaises(lib.NotAVolume):
            lib._extract_fidelity_zip(archive, self.folder / "out2")

    def test_error_messages_come_from_the_server(self):
        self.assertEqual(lib._error_message(404, b'{"detail": "no model named \'x\'"}', {}), "no model named 'x'")
        self.assertEqual(lib._error_message(422, b'{"detail": [{"msg": "field required"}]}', {}), "field required")
        self.assertEqual(lib._error_message(502, b"<html>proxy</html>", {"content-type": "text/html"}), "Bad Gateway")
        error = lib.ServerError(404, "no model named 'x'")
        self.assertEqual((error.status, error.message), (404, "no model named 'x'"))
        self.assertIn("404", str(error))

    def test_server_key_names_scheme_host_and_port(self):
        self.assertEqual(lib.server_key("HTTP://LocalHost:8000/"), "http://localhost:8000")
        self.assertEqual(lib.server_key("https://example.org/lowdose"), "https://example.org:443")
        self.assertEqual(lib.server_key("http://[::1]:8000"), "http://[::1]:8000")
        for bad in ("ftp://x", "127.0.0.1:8000", "http://", "http://h:99999"):
            self.assertRaises(ValueError, lib.server_key, bad)

    def test_a_token_that_cannot_be_sent_is_refused_without_showing_it(self):
        for bad in ("two words", "line\nbreak", "accent\u00e9"):
            with self.assertRaises(ValueError) as caught:
                lib.LowDoseClient("http://127.0.0.1:8000", settings.JsonConsentStore(self.folder / "c.json"), token=bad)
            self.assertNotIn(bad, str(caught.exception))
            self.assertIn("copy it again", str(caught.exception))

    def test_the_token_is_in_no_repr_and_no_error_message(self):
        client = lib.LowDoseClient(
            "http://127.0.0.1:8000", settings.JsonConsentStore(self.folder / "c.json"), token=TOKEN
        )
        self.assertTrue(client.has_token)
        self.assertNotIn(TOKEN, repr(client))
        self.assertIn("token=given", repr(client))
        self.assertIn("token=none", repr(lib.LowDoseClient("http://127.0.0.1:8000", client.consent)))
        for given in (True, False):
            error = lib.AuthenticationError("http://127.0.0.1:8000", token_given=given)
            self.assertIsInstance(error, lib.ServerError)
            self.assertEqual(error.status, 401)
            self.assertIn("Server token field", str(error))
            self.assertIn("lowdose serve --show-token", str(error))
            self.assertEqual("did not accept" in str(error), given)

    def test_refused_before_connecting_without_consent(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        try:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            volume = self.folder / "v.nii"
            volume.write_bytes(nifti_header() + bytes(512))
            client = lib.LowDoseClient(url, settings.JsonConsentStore(self.folder / "consent.json"))
            with self.assertRaises(lib.ConsentRequired):
                client.denoise(volume, "denoise_x")
            with self.assertRaises(socket.timeout):
                listener.accept()
        finally:
            listener.close()

    def test_a_bad_strength_is_refused_before_anything_is_sent(self):
        volume = self.folder / "v.nii"
        volume.write_bytes(nifti_header() + bytes(512))
        client = lib.LowDoseClient("http://127.0.0.1:9", settings.JsonConsentStore(self.folder / "consent.json"))
        client.consent.allow(client.url)  # port 9: nothing listens, yet no connection is even tried
        for bad in ("strong", 1.5, -0.1, "nan", True):
            with self.assertRaises(ValueError) as caught:
                client.denoise(volume, "denoise_x", strength=bad)
            self.assertIn("strength", str(caught.exception))
            with self.assertRaises(ValueError):
                client.fidelity(volume, "x", strength=bad)

    def test_bad_steps_are_refused_before_anything_is_sent(self):
        volume = self.folder / "v.nii"
        volume.write_bytes(nifti_header() + bytes(512))
        client = lib.LowDoseClient("http://127.0.0.1:9", settings.JsonConsentStore(self.folder / "consent.json"))
        client.consent.allow(client.url)  # port 9: nothing listens, yet no connection is even tried
        for bad in BAD_STEPS:
            with self.assertRaises(ValueError) as caught:
                client.denoise(volume, "denoise_dose_diffusion", steps=bad)
            self.assertIn("steps", str(caught.exception))
            with self.assertRaises(ValueError) as caught:
                client.fidelity(volume, "dose_diffusion", steps=bad)
            self.assertIn("steps", str(caught.exception))

    def test_the_ensemble_is_checked_named_and_refused_before_anything_is_sent(self):
        self.assertEqual([ensemble.check_ensemble(n) for n in (1, 2, 4, 8)], [1, 2, 4, 8])
        self.assertEqual([ensemble.ensemble_name(n) for n in (1, 8)], ["", "x8"])
        self.assertEqual(ensemble.ensemble_choice(ensemble.ensemble_label(4)), 4)
        volume = self.folder / "v.nii"
        volume.write_bytes(nifti_header() + bytes(512))
        client = lib.LowDoseClient("http://127.0.0.1:9", settings.JsonConsentStore(self.folder / "consent.json"))
        client.consent.allow(client.url)  # port 9: nothing listens, yet no connection is even tried
        for bad in (0, 3, 16, "8", True, 2.0, None, [8]):
            self.assertRaises(ValueError, ensemble.check_ensemble, bad)
            with self.assertRaises(ValueError) as caught:
                client.denoise(volume, "denoise_dose_unet", ensemble=bad)
            self.assertIn("must be one of 1, 2, 4, 8", str(caught.exception))
            self.assertRaises(ValueError, client.fidelity, volume, "dose_unet", ensemble=bad)

    def test_the_steps_go_in_the_params_only_when_given(self):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
        httpd.params = []
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            client = lib.LowDoseClient(
                f"http://127.0.0.1:{httpd.server_address[1]}", settings.JsonConsentStore(self.folder / "c.json")
            )
            client.consent.allow(client.url)
            volume = self.folder / "v.nii"
            volume.write_bytes(nifti_header() + bytes(512))
            httpd.reply = (200, "application/octet-stream", gzip.compress(volume.read_bytes()))
            for asked in (None, 1, 4):
                shutil.rmtree(str(client.denoise(volume, "denoise_dose_diffusion", steps=asked).folder))
            for bad in BAD_STEPS:
                self.assertRaises(ValueError, client.denoise, volume, "denoise_dose_diffusion", steps=bad)
            report = {"study": {"verdict": "kept"}, "structures": []}
            httpd.reply = (200, "application/json", json.dumps(report).encode())
            for asked in (None, 3):
                self.assertEqual(client.fidelity(volume, "dose_diffusion", labels=False, steps=asked).report, report)
            for bad in BAD_STEPS:
                self.assertRaises(ValueError, client.fidelity, volume, "dose_diffusion", steps=bad)
        finally:
            httpd.shutdown()
            httpd.server_close()
        sent = httpd.params
        self.assertEqual(len(sent), 5)  # the bad ones were never sent
        self.assertEqual([p.get("steps", "absent") for p in sent], ["absent", 1, 4, "absent", 3])
        self.assertEqual((sent[1]["strength"], sent[4]["denoise_model"]), ("medium", "dose_diffusion"))

    def test_each_models_sampling_steps_come_from_the_server_info(self):
        client = lib.LowDoseClient("http://127.0.0.1:9", settings.JsonConsentStore(self.folder / "c.json"))
        models = client.models(INFO)
        self.assertEqual([m.task for m in models], ["denoise_dose_diffusion", "denoise_dose_unet", "denoise_redcnn"])
        self.assertEqual([m.sampling_steps for m in models], [2, None, None])  # redcnn's server predates steps
        self.assertEqual(lib.ModelInfo(task="t", model="m").sampling_steps, None)
        for junk in ("2", True, 0, 9, 2.5, [2]):  # a value no server sends is no number of steps
            info = json.loads(json.dumps(INFO))
            info["models"]["denoise_dose_diffusion"]["lowdose"]["sampling_steps"] = junk
            self.assertIsNone(client.models(info)[0].sampling_steps, junk)
        info["models"]["denoise_dose_diffusion"]["lowdose"]["sampling_steps"] = 4
        self.assertEqual(client.models(info)[0].sampling_steps, 4)

    def test_closed_port_is_server_unreachable(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = lib.LowDoseClient(f"http://127.0.0.1:{port}", settings.JsonConsentStore(self.folder / "c.json"))
        with self.assertRaises(lib.ServerUnreachable):
            client.info()


class JobsTest(FolderTestCase):
    """jobs.py: a request in a background thread; an upload that writes nothing without permission."""

    def test_background_job(self):
        def work(progress, cancel):
            for k in range(3):
                progress(lib.Progress("upload", k, 3))
            return "done"

        job = BackgroundJob(work).start()
        self.assertTrue(job.wait(5))
        self.assertEqual((job.result, job.error), ("done", None))

        def slow(progress, cancel):
            while not cancel.is_set():
                time.sleep(0.01)
            raise lib.Cancelled("cancelled")

        job = BackgroundJob(slow).start()
        job.cancel()
        self.assertTrue(job.wait(2))
        self.assertIsInstance(job.error, lib.Cancelled)

        def fails(progress, cancel):
            raise lib.ServerError(500, "boom")

        job = BackgroundJob(fails).start()
        self.assertTrue(job.wait(2))
        self.assertIsInstance(job.error, lib.ServerError)

    def test_progress_reports_reach_the_polling_thread_in_order(self):
        job = BackgroundJob(lambda progress, cancel: [progress(lib.Progress("upload", k, 4)) for k in range(4)])
        job.start()
        seen = []
        while not job.done:
            seen += job.poll()
        self.assertEqual([report.done for report in seen], [0, 1, 2, 3])

    def export(self):
        """Write a small volume file in its own temporary folder, as the logic's export does."""
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=str(self.folder)))
        (folder / "volume.nrrd").write_bytes(b"NRRD0004\n")
        self.exported.append(folder)
        return str(folder / "volume.nrrd"), str(folder)

    def test_an_upload_without_permission_writes_nothing(self):
        self.exported = []
        client = lib.LowDoseClient("http://127.0.0.1:8000", settings.JsonConsentStore(self.folder / "c.json"))
        with self.assertRaises(lib.ConsentRequired) as caught:
            start_upload(client, self.export, lambda *a, **k: self.fail("sent"))
        self.assertEqual(caught.exception.server, "http://127.0.0.1:8000")
        self.assertEqual(self.exported, [])

    def test_an_upload_sends_the_file_and_removes_its_folder_whatever_happens(self):
        self.exported = []
        client = lib.LowDoseClient("http://127.0.0.1:8000", settings.JsonConsentStore(self.folder / "c.json"))
        client.consent.allow(client.url)
        sent = []

        def send(client_, path, progress, cancel):
            sent.append((client_, Path(path).read_bytes(), isinstance(cancel, threading.Event)))
            progress(lib.Progress("upload", 9, 9))
            return "answer"

        job = start_upload(client, self.export, send, name="test-upload")
        self.assertTrue(job.wait(5))
        self.assertEqual(job.result, "answer")
        self.assertEqual(sent, [(client, b"NRRD0004\n", True)])
        self.assertFalse(self.exported[0].exists())

        def fails(client_, path, progress, cancel):
            raise lib.ServerError(500, "boom")

        job = start_upload(client, self.export, fails)
        self.assertTrue(job.wait(5))
        self.assertIsInstance(job.error, lib.ServerError)
        self.assertFalse(self.exported[1].exists())


class SettingsTest(FolderTestCase):
    """settings.py: what the module remembers, under the keys Slicer's settings have always used."""

    def test_consent_store(self):
        store = settings.JsonConsentStore(self.folder / "consent.json")
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))
        store.allow("http://127.0.0.1:8000/")
        self.assertTrue(settings.JsonConsentStore(store.path).is_allowed("http://127.0.0.1:8000"))
        self.assertFalse(store.is_allowed("http://127.0.0.1:8001"))
        self.assertFalse(store.is_allowed("https://127.0.0.1:8000"))
        store.revoke("http://127.0.0.1:8000")
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))
        store.path.write_text(json.dumps({"servers": {"http://127.0.0.1:8000": {"allowed": "yes"}}}))
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))  # only a literal true is consent
        memory, load, save = memory_store()
        backed = settings.ConsentStore(load, save)
        backed.allow("http://localhost:8000")
        self.assertEqual(backed.allowed_servers(), ["http://localhost:8000"])

    def test_token_store_keeps_one_token_per_server(self):
        memory, load, save = memory_store()
        store = settings.TokenStore(load, save)
        self.assertEqual(store.get("http://127.0.0.1:8000"), "")
        store.set("http://127.0.0.1:8000/", "  Bearer abc.DEF-123_~+/=  ")  # pasted with the header's word
        self.assertEqual(store.get("http://127.0.0.1:8000"), "abc.DEF-123_~+/=")
        self.assertEqual(store.get("http://127.0.0.1:8001"), "")  # another port is another server
        self.assertEqual(store.get("https://127.0.0.1:8000"), "")
        store.set("http://127.0.0.1:8000", "")  # an empty token forgets it
        self.assertEqual(store.get("http://127.0.0.1:8000"), "")
        self.assertNotIn("abc.DEF", memory["text"])
        memory["text"] = "{not json"
        self.assertEqual(store.get("http://127.0.0.1:8000"), "")  # damaged settings: no token, no crash

    def test_server_addresses_most_recent_first_at_most_ten(self):
        module = settings.ModuleSettings(settings.MemorySettings())
        self.assertEqual(module.server_urls(), [settings.DEFAULT_SERVER_URL])
        self.assertEqual(module.server_url(), settings.DEFAULT_SERVER_URL)
        for port in range(8001, 8013):
            module.remember_server_url(f"http://127.0.0.1:{port}")
        urls = module.remember_server_url("http://127.0.0.1:8005")
        self.assertEqual(urls[:2], ["http://127.0.0.1:8005", "http://127.0.0.1:8012"])
        self.assertEqual(len(urls), settings.MAX_URL_HISTORY)
        self.assertEqual(len(set(urls)), len(urls))
        self.assertEqual(module.server_urls(), urls)
        self.assertEqual(module.server_url(), "http://127.0.0.1:8005")

    def test_the_keys_are_those_slicer_settings_already_hold(self):
        """A user's settings from before keep working: same group, same key names."""
        store = settings.MemorySettings(
            {
                "LowDoseDenoise/ServerUrl": "http://gpu:8000",
                "LowDoseDenoise/ServerUrlHistory": "http://gpu:8000\nhttp://127.0.0.1:8000",
                "LowDoseDenoise/Dose": "1/4",
                "LowDoseDenoise/ModelTask": "denoise_redcnn",
                "LowDoseDenoise/ResponseTimeoutSeconds": "3600",
            }
        )
        module = settings.ModuleSettings(store)
        self.assertEqual(
            (module.server_url(), module.server_urls()),
            ("http://gpu:8000", ["http://gpu:8000", "http://127.0.0.1:8000"]),
        )
        self.assertEqual((module.dose(), module.model_task()), ("1/4", "denoise_redcnn"))
        self.assertEqual(module.strength(), "medium")  # the default, for settings from before strengths
        module.set_strength("low")
        self.assertEqual((store.values["LowDoseDenoise/Strength"], module.strength()), ("low", "low"))
        self.assertEqual(module.timeouts(), lib.Timeouts(response=3600.0))
        module.consent().allow("http://gpu:8000")
        module.tokens().set("http://gpu:8000", TOKEN)
        module.set_dose("0.3")
        module.set_model_task("denoise_dose_unet")
        self.assertIn("http://gpu:8000", json.loads(store.values["LowDoseDenoise/UploadConsent"])["servers"])
        self.assertEqual(json.loads(store.values["LowDoseDenoise/ServerTokens"])["tokens"], {"http://gpu:8000": TOKEN})
        self.assertEqual(
            (store.values["LowDoseDenoise/Dose"], store.values["LowDoseDenoise/ModelTask"]),
            ("0.3", "denoise_dose_unet"),
        )
        again = settings.ModuleSettings(store)  # the next session
        self.assertTrue(again.consent().is_allowed("http://gpu:8000"))
        self.assertEqual(again.tokens().get("http://gpu:8000"), TOKEN)

    def test_the_sampling_steps_chosen_are_remembered(self):
        store = settings.MemorySettings()
        module = settings.ModuleSettings(store)
        self.assertIsNone(module.steps())  # at first: each model's own
        module.set_steps(4)
        self.assertEqual((store.values["LowDoseDenoise/SamplingSteps"], module.steps()), ("4", 4))
        self.assertEqual(settings.ModuleSettings(store).steps(), 4)  # the next session
        module.set_steps(None)
        self.assertEqual((store.values["LowDoseDenoise/SamplingSteps"], module.steps()), ("", None))
        for bad in (0, 5, "2", True):
            self.assertRaises(ValueError, module.set_steps, bad)
        self.assertIsNone(module.steps())
        for junk in ("0", "9", "two", "2.5", "-1"):  # damaged settings: each model's own, no crash
            self.assertIsNone(
                settings.ModuleSettings(settings.MemorySettings({"LowDoseDenoise/SamplingSteps": junk})).steps()
            )
        self.assertEqual(
            settings.ModuleSettings(settings.MemorySettings({"LowDoseDenoise/SamplingSteps": 3})).steps(), 3
        )

    def test_time_limits_fall_back_to_the_defaults(self):
        default = lib.Timeouts()
        self.assertEqual(settings.ModuleSettings(settings.MemorySettings()).timeouts(), default)
        store = settings.MemorySettings(
            {
                "LowDoseDenoise/ConnectTimeoutSeconds": "2.5",
                "LowDoseDenoise/ResponseTimeoutSeconds": "an hour",
                "LowDoseDenoise/IdleTimeoutSeconds": "",
            }
        )
        self.assertEqual(
            settings.ModuleSettings(store).timeouts(),
            lib.Timeouts(connect=2.5, response=default.response, idle=default.idle),
        )


class DoseTest(unittest.TestCase):
    """dose.py: the dose as the user gives it, in the menu or typed."""

    def test_parse_dose(self):
        self.assertEqual(dose.parse_dose("auto"), "auto")
        self.assertEqual(dose.parse_dose(""), "auto")
        self.assertEqual(dose.parse_dose(None), "auto")
        for text in ("1/4", "25%", "0.25", " 1/4 (25 % of normal dose)"):
            self.assertEqual(dose.parse_dose(text), 0.25, text)
        for bad in ("0", "1.5", "x", "1/0", "-1/4", "200%"):
            self.assertRaises(ValueError, dose.parse_dose, bad)

    def test_every_menu_text_reads_back_as_its_choice(self):
        self.assertEqual(dose.dose_label("auto"), "auto (estimated from the image)")
        self.assertEqual(dose.dose_label("1/4"), "1/4 (25 % of normal dose)")
        self.assertEqual(dose.dose_label("1/3"), "1/3 (33.3 % of normal dose)")
        labels = [dose.dose_label(choice) for choice in dose.DOSE_CHOICES]
        self.assertEqual(len(set(labels)), len(labels))
        for choice, label in zip(dose.DOSE_CHOICES, labels):
            self.assertEqual(dose.dose_choice(label), choice)
            self.assertEqual(dose.parse_dose(label), dose.parse_dose(choice))

    def test_a_typed_dose_is_taken_as_typed(self):
        self.assertEqual(dose.dose_choice(" 0.3 "), "0.3")
        self.assertEqual(dose.dose_choice("1/4"), "1/4")
        self.assertEqual(dose.dose_choice("1/4 (25 % of normal dose) "), "1/4 (25 % of normal dose)")


class ResultsTest(unittest.TestCase):
    """results.py: the fidelity table and the record kept on each denoised volume."""

    def test_fidelity_rows(self):
        rows = results.fidelity_rows(REPORT)
        self.assertEqual([r["name"] for r in rows], ["kidney_right", "spleen"])  # flagged first, absent left out
        self.assertTrue(rows[0]["flagged"] and not rows[1]["flagged"])
        self.assertEqual(rows[1]["dice"], 0.97)
        self.assertEqual(rows[0]["reasons"], "Dice 0.60 < 0.80; HU mean +60")
        self.assertEqual(results.fidelity_rows(REPORT, flagged_only=True), rows[:1])
        check = dict(REPORT["structures"][0], name="aorta", verdict="check")
        order = results.fidelity_rows({"structures": [REPORT["structures"][0], check, REPORT["structures"][1]]})
        self.assertEqual([r["verdict"] for r in order], ["changed", "check", "kept"])

    def test_fidelity_cells_follow_the_columns(self):
        kidney, spleen = results.fidelity_rows(REPORT)
        self.assertEqual(len(results.FIDELITY_COLUMNS), len(results.fidelity_cells(spleen)))
        self.assertEqual(
            results.fidelity_cells(kidney), ["kidney_right", "changed", "0.600", "30.0", "90.0", "25.0", "8.0", "yes"]
        )
        self.assertEqual(results.fidelity_cells(dict(spleen, dice=None, hu_sd_after=None))[2::4], ["", ""])
        self.assertEqual(results.fidelity_cells(spleen)[-1], "")
        self.assertEqual(set(results.VERDICT_COLOURS), set(results.FLAGGED_VERDICTS))

    def test_verdict_flagged_and_label_names(self):
        self.assertEqual(results.fidelity_verdict(REPORT), "Verdict: CHANGED - 1 of 2 structures changed")
        self.assertEqual(results.fidelity_verdict({}), "Verdict: ? - ")
        self.assertEqual(results.flagged_structures(REPORT), {"kidney_right"})
        names = results.fidelity_label_names(REPORT)
        self.assertEqual(names, {1: "spleen", 2: "kidney_right", 5: "brain"})
        self.assertEqual(
            results.colour_table_names(names), ["background", "spleen", "kidney_right", "label_3", "label_4", "brain"]
        )
        self.assertEqual(results.colour_table_names({}), ["background"])

    def test_structure_colours(self):
        self.assertEqual(results.structure_colour(0), (0.0, 0.0, 0.0))
        colours = [results.structure_colour(value) for value in range(1, 118)]  # TotalSegmentator's 117 classes
        self.assertTrue(all(0.0 <= c <= 1.0 for colour in colours for c in colour))
        self.assertEqual(len(set(colours)), len(colours))
        for a, b in zip(colours, colours[1:]):  # neighbouring labels are told apart
            self.assertGreater(sum(abs(x - y) for x, y in zip(a, b)), 0.3)

    def test_a_denoised_volume_is_found_by_model_and_dose(self):
        self.assertEqual(results.denoised_volume_name("chest CT", "dose_unet"), "chest CT_denoised_dose_unet")
        given = results.denoised_record(  # made before strengths existed: all the noise removed ("high")
            "dose_unet", "denoise_dose_unet", {"dose_fraction": 0.25, "dose_source": "given", "seconds": 3.2}
        )
        self.assertEqual(
            json.loads(given),
            {
                "model": "dose_unet",
                "task": "denoise_dose_unet",
                "dose_fraction": 0.25,
                "dose_source": "given",
                "seconds": 3.2,
            },
        )
        self.assertTrue(results.made_with(given, "dose_unet", 0.25, "high"))
        self.assertTrue(results.made_with(given, "dose_unet", 1 / 4 + 1e-9, 1.0))
        self.assertFalse(results.made_with(given, "dose_unet", 0.2, "high"))
        self.assertFalse(results.made_with(given, "redcnn", 0.25, "high"))
        self.assertFalse(results.made_with(given, "dose_unet", "auto", "high"))  # the dose was given, not estimated
        self.assertFalse(results.made_with(given, "dose_unet", 0.25))  # the default strength is medium
        versioned = json.dumps({**json.loads(given), "model_version": "8.0.0"})
        self.assertTrue(results.made_with(versioned, "dose_unet", 0.25, "high", version="8.0.0"))
        self.assertFalse(results.made_with(versioned, "dose_unet", 0.25, "high", version="9.0.0"))  # server updated
        self.assertTrue(results.made_with(given, "dose_unet", 0.25, "high", version="9.0.0"))  # record names none
        estimated = results.denoised_record(
            "dose_unet", "t", {"dose_fraction": 0.31, "dose_source": "estimated", "strength": 0.7}
        )
        self.assertTrue(results.made_with(estimated, "dose_unet", "auto"))
        for junk in (None, "", "{not json", "[1, 2]", '{"model": "dose_unet", "dose_fraction": "a lot"}'):
            self.assertFalse(results.made_with(junk, "dose_unet", 0.25), junk)
        self.assertFalse(results.made_with('{"model": "dose_unet", "strength": "a lot"}', "dose_unet", "auto"))

    def test_a_volume_denoised_at_another_strength_is_not_taken_for_it(self):
        summary = {"dose_fraction": 0.25, "dose_source": "given", "strength": 0.7, "description": "x, strength medium"}
        medium = results.denoised_record("dose_unet", "denoise_dose_unet", summary, "low")  # the server's wins
        self.assertEqual(json.loads(medium)["strength"], 0.7)
        self.assertEqual(results.record_strength(medium), 0.7)
        self.assertTrue(results.made_with(medium, "dose_unet", 0.25, "medium"))
        self.assertTrue(results.made_with(medium, "dose_unet", 0.25, 0.7))
        self.assertFalse(results.made_with(medium, "dose_unet", 0.25, "low"))
        self.assertFalse(results.made_with(medium, "dose_unet", 0.25, "high"))
        # a summary without the strength (the fidelity check's) records the strength asked for
        low = results.denoised_record("dose_unet", "t", {"dose_fraction": 0.25, "dose_source": "given"}, "low")
        self.assertEqual(results.record_strength(low), 0.4)
        self.assertTrue(results.made_with(low, "dose_unet", 0.25, "low"))
        self.assertFalse(results.made_with(low, "dose_unet", 0.25, "medium"))
        self.assertEqual(results.record_strength('{"model": "x"}'), 1.0)
        for junk in (None, "", "{not json", '{"strength": 7}'):
            self.assertIsNone(results.record_strength(junk), junk)
        name = results.denoised_volume_name
        self.assertEqual(name("chest CT", "dose_unet", "medium"), "chest CT_denoised_dose_unet_medium")
        self.assertEqual(name("chest CT", "dose_unet", 0.7), "chest CT_denoised_dose_unet_medium")
        self.assertEqual(name("chest CT", "dose_unet", 1.0), "chest CT_denoised_dose_unet_high")
        self.assertEqual(name("chest CT", "dose_unet", 0.55), "chest CT_denoised_dose_unet_0.55")

    def test_a_volume_denoised_in_other_sampling_steps_is_not_taken_for_it(self):
        summary = {"dose_fraction": 0.25, "dose_source": "given", "strength": 0.7, "steps": 2}
        two = results.denoised_record("dose_diffusion", "denoise_dose_diffusion", summary, "medium", 4)
        self.assertEqual(results.record_steps(two), 2)  # the server's wins over the steps asked for
        self.assertTrue(results.made_with(two, "dose_diffusion", 0.25, "medium", 2))
        self.assertFalse(results.made_with(two, "dose_diffusion", 0.25, "medium", 4))
        self.assertFalse(results.made_with(two, "dose_diffusion", 0.25, "medium"))  # steps None: no steps
        # a summary without the steps (a server from before them) records the steps asked for
        asked = results.denoised_record("dose_diffusion", "t", {"dose_fraction": 0.25, "dose_source": "given"}, 1.0, 4)
        self.assertEqual((results.record_steps(asked), json.loads(asked)["steps"]), (4, 4))
        self.assertTrue(results.made_with(asked, "dose_diffusion", 0.25, "high", 4))
        self.assertFalse(results.made_with(asked, "dose_diffusion", 0.25, "high", 2))
        # a model that takes no steps: its record has none, and it matches only no steps
        plain = results.denoised_record(
            "dose_unet", "t", {"dose_fraction": 0.25, "dose_source": "given", "steps": None}
        )
        self.assertIsNone(results.record_steps(plain))
        self.assertTrue(results.made_with(plain, "dose_unet", 0.25, "high"))
        self.assertFalse(results.made_with(plain, "dose_unet", 0.25, "high", 2))
        for junk in ("2", True, 2.5, [2]):  # steps that are not a number match nothing
            record = json.dumps({"model": "dose_diffusion", "dose_fraction": 0.25, "strength": 1.0, "steps": junk})
            self.assertIsNone(results.record_steps(record), junk)
            for asked in (None, 1, 2):
                self.assertFalse(results.made_with(record, "dose_diffusion", 0.25, "high", asked), (junk, asked))
        for junk in (None, "", "{not json", "[2]"):
            self.assertIsNone(results.record_steps(junk), junk)
        name = results.denoised_volume_name
        self.assertEqual(name("ct", "dose_diffusion", "medium", 2), "ct_denoised_dose_diffusion_medium_2steps")
        self.assertEqual(name("ct", "dose_diffusion", 1.0, 1), "ct_denoised_dose_diffusion_high_1step")
        self.assertEqual(name("ct", "dose_unet", "medium", None), "ct_denoised_dose_unet_medium")


class StrengthTest(unittest.TestCase):
    """strength.py: the denoising strength as the user gives it (low / medium / high, or a fraction)."""

    def test_parse_strength(self):
        self.assertEqual(strength.STRENGTH_CHOICES, ("low", "medium", "high"))
        for empty in (None, "", "  "):
            self.assertEqual(strength.parse_strength(empty), "medium")
        for text, expected in (("low", "low"), (" High ", "high"), ("Medium", "medium"), ("MEDIUM x", "medium")):
            self.assertEqual(strength.parse_strength(text), expected, text)
        for text, expected in (("0.5", 0.5), ("0", 0.0), ("1", 1.0), ("55%", 0.55), (0.3, 0.3), (1, 1.0)):
            self.assertAlmostEqual(strength.parse_strength(text), expected, msg=text)
        for bad in ("strong", "1.5", "-0.1", "150%", "nan", "inf", 2, True, "lowest"):
            with self.assertRaises(ValueError) as caught:
                strength.parse_strength(bad)
            self.assertIn("strength must", str(caught.exception), bad)

    def test_fractions_names_and_menu_texts(self):
        self.assertEqual([strength.strength_fraction(c) for c in strength.STRENGTH_CHOICES], [0.4, 0.7, 1.0])
        self.assertEqual(strength.strength_fraction(0.55), 0.55)
        self.assertEqual([strength.strength_name(f) for f in (0.4, 0.7, 1.0, 0.55)], ["low", "medium", "high", "0.55"])
        labels = [strength.strength_label(c) for c in strength.STRENGTH_CHOICES]
        self.assertEqual(labels, ["Low", "Medium", "High"])
        for choice, label in zip(strength.STRENGTH_CHOICES, labels):
            self.assertEqual(strength.parse_strength(label), choice)


class StepsTest(unittest.TestCase):
    """steps.py: a diffusion model's sampling steps as the menu shows them and the client sends them."""

    def test_check_steps(self):
        self.assertEqual(steps.STEPS_CHOICES, (1, 2, 3, 4))
        self.assertIsNone(steps.check_steps(None))
        for good in steps.STEPS_CHOICES:
            self.assertEqual(steps.check_steps(good), good)
        for bad in BAD_STEPS + (10**9, 4.0, "4"):
            with self.assertRaises(ValueError) as caught:
                steps.check_steps(bad)
            self.assertIn("sampling steps must be an integer from 1 to 4", str(caught.exception))

    def test_every_menu_text_reads_back_as_its_choice_and_the_default_is_marked(self):
        labels = [steps.steps_label(choice, 2) for choice in steps.STEPS_CHOICES]
        self.assertEqual(labels, ["1", "2 (model default)", "3", "4"])
        for choice in steps.STEPS_CHOICES:
            self.assertEqual(steps.steps_choice(steps.steps_label(choice, choice)), choice)
            self.assertEqual(steps.steps_choice(steps.steps_label(choice, None)), choice)
        for bad in ("", None, "0", "5", "two", "\u00b2", "-1", "2.5"):
            self.assertRaises(ValueError, steps.steps_choice, bad)

    def test_the_steps_used_are_those_asked_else_the_models_own(self):
        self.assertEqual(steps.steps_used(None, 2), 2)
        self.assertEqual(steps.steps_used(4, 2), 4)
        self.assertIsNone(steps.steps_used(None, None))
        self.assertEqual([steps.steps_name(k) for k in (1, 2, 4)], ["1step", "2steps", "4steps"])


class MessagesTest(unittest.TestCase):
    """messages.py: what the user is told."""

    MODEL = lib.ModelInfo(
        task="denoise_dose_unet",
        model="dose_unet",
        description="Dose-aware U-Net.",
        dose_aware=True,
        validation={"val_psnr_abdomen": 41.234},
    )

    def test_connection_status(self):
        info = {"lowdose": {"version": "0.4.0", "device": "cuda"}, "models": {"denoise_dose_unet": {}, "fidelity": {}}}
        self.assertEqual(
            messages.connected(info, [self.MODEL]), "Connected: lowdose 0.4.0 on cuda, 1 model(s), fidelity check."
        )
        self.assertEqual(messages.connected({"models": {}}, []), "Connected: lowdose ? on ?, 0 model(s).")
        self.assertIn("access token", messages.not_connected(lib.AuthenticationError("http://h:1", False)))
        self.assertEqual(messages.not_connected(lib.ServerUnreachable("no")), "Not connected.")

    def test_model_texts(self):
        self.assertEqual(
            messages.model_description(self.MODEL), "Dose-aware U-Net. Validation PSNR (abdomen): 41.23 dB."
        )
        plain = lib.ModelInfo(
            task="denoise_redcnn", model="redcnn", description="RED-CNN.", validation={"val_psnr_abdomen": "n/a"}
        )
        self.assertEqual(messages.model_description(plain), "RED-CNN.")
        self.assertEqual(messages.model_label(self.MODEL), "dose_unet  (dose-aware)")
        self.assertEqual(messages.model_label(plain), "redcnn")
        versioned = lib.ModelInfo(task="denoise_dose_unet", model="dose_unet", version="7.0.0", dose_aware=True)
        self.assertEqual(messages.model_label(versioned), "dose_unet 7.0.0  (dose-aware)")
        self.assertNotEqual(messages.dose_tooltip(self.MODEL), messages.dose_tooltip(plain))
        diffusion = lib.ModelInfo(task="denoise_dose_diffusion", model="dose_diffusion", sampling_steps=2)
        self.assertIn("2, marked, is the model's default", messages.steps_tooltip(diffusion))
        self.assertIn("not a diffusion model", messages.steps_tooltip(plain))

    def test_the_consent_question_says_where_the_volume_goes(self):
        for url in ("http://127.0.0.1:8000", "http://localhost:9000/", "http://[::1]:8000"):
            question = messages.consent_question(url)
            self.assertIn("a server on this computer", question, url)
            self.assertIn(lib.server_key(url), question)
        self.assertIn("ANOTHER COMPUTER", messages.consent_question("https://pacs.hospital.org"))
        self.assertRaises(ValueError, messages.consent_question, "not an address")

    def test_progress(self):
        self.assertEqual(
            messages.progress(lib.Progress("waiting", elapsed_s=12.4)), ("The server is working... 12 s", None)
        )
        self.assertEqual(
            messages.progress(lib.Progress("upload", 2_000_000, 4_000_000)), ("Sending 2.0 MB of 4.0 MB", 50)
        )
        self.assertEqual(messages.progress(lib.Progress("download", 1_000_000)), ("Receiving 1.0 MB", 0))

    def test_request_outcomes(self):
        self.assertNotEqual(messages.request_started(messages.DENOISE), messages.request_started(messages.FIDELITY))
        self.assertEqual(messages.request_failed("denoise", lib.Timeout("slow")), "The denoise request failed.")
        self.assertIn("access token", messages.request_failed("fidelity", lib.AuthenticationError("http://h:1", True)))
        self.assertEqual(
            messages.denoise_done({"description": "dose_unet at 25 % (given)", "seconds": 3.21}, "x"),
            "Done: dose_unet at 25 % (given) in 3.2 s on the server.",
        )
        self.assertEqual(messages.denoise_done({}, "ct_denoised"), "Done: ct_denoised in 0.0 s on the server.")
        estimated = {
            "description": "d",
            "seconds": 1,
            "dose_source": "estimated",
            "dose_detail": "read from the in-plane noise of 1 slice",
        }
        self.assertEqual(
            messages.denoise_done(estimated, "x"),
            "Done: d in 1.0 s on the server. The dose was read from the in-plane noise of 1 slice.",
        )

    def test_foreseen_errors_speak_for_themselves_others_point_to_the_log(self):
        for error in (lib.ServerError(404, "no model named 'x'"), ValueError("bad dose"), OSError("disk full")):
            text, foreseen = messages.error_text("The denoise request failed", error)
            self.assertTrue(foreseen)
            self.assertEqual(text, f"The denoise request failed:\n\n{error}")
        text, foreseen = messages.error_text("Could not show the result", KeyError("labels_original"))
        self.assertFalse(foreseen)
        self.assertIn("KeyError", text)
        self.assertIn("Details are in the log", text)

    def test_no_message_shows_the_token(self):
        try:
            lib.normalise_token(TOKEN + " pasted twice")
        except ValueError as exc:
            self.assertNotIn(TOKEN, messages.error_text("Could not connect", exc)[0])
        refused = lib.AuthenticationError("http://127.0.0.1:8000", token_given=True)
        self.assertNotIn(TOKEN, messages.request_failed("denoise", refused) + messages.error_text("x", refused)[0])

    def test_denoise_tooltip(self):
        self.assertEqual(messages.denoise_tooltip(False, True), "Choose a CT volume.")
        self.assertEqual(messages.denoise_tooltip(True, False), "Connect to a lowdose server first.")
        self.assertIn("Send the volume", messages.denoise_tooltip(True, True))


TEST_CASES = (ClientTest, JobsTest, SettingsTest, DoseTest, ResultsTest, StrengthTest, StepsTest, MessagesTest)


def runTest():
    """Entry point when Slicer runs this file."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(case) for case in TEST_CASES)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()


if __name__ == "__main__":
    unittest.main()
