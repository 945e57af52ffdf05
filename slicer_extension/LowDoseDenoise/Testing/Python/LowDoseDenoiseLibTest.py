"""Tests of LowDoseDenoiseLib that need neither a server nor Slicer's widgets.

They run in Slicer's own Python (registered with slicer_add_python_unittest) and in the repository's CI
(tests/test_slicer_module.py runs this file with plain Python), so the client is checked on the Python
version Slicer ships. The full client is tested against the real server in tests/test_slicer_client.py.
"""

import gzip
import json
import shutil
import socket
import struct
import sys
import tempfile
import time
import unittest
import zipfile
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent.parent
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from LowDoseDenoiseLib import client as lib  # noqa: E402
from LowDoseDenoiseLib.jobs import BackgroundJob  # noqa: E402


def nifti_header(dims=(3, 8, 8, 4)) -> bytes:
    """A minimal NIfTI-1 header (348 bytes + 4 bytes extension flag) for a 3-D int16 volume."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, *(list(dims) + [1] * (8 - len(dims))))
    struct.pack_into("<h", header, 70, 4)  # datatype int16
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\x00"
    return bytes(header) + b"\x00\x00\x00\x00"


class LowDoseDenoiseLibTest(unittest.TestCase):
    def setUp(self):
        self.folder = Path(tempfile.mkdtemp(prefix="lowdose-libtest-"))

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

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
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="params"\r\n'
                b"Content-Type: application/json\r\n\r\n" + json.dumps({"dose_fraction": 0.25}).encode()
                + b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
                b'filename="../../denoised.nii.gz"\r\n\r\n' + image + b"\r\n--" + boundary + b"--\r\n")
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

    def test_consent_store(self):
        store = lib.JsonConsentStore(self.folder / "consent.json")
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))
        store.allow("http://127.0.0.1:8000/")
        self.assertTrue(lib.JsonConsentStore(store.path).is_allowed("http://127.0.0.1:8000"))
        self.assertFalse(store.is_allowed("http://127.0.0.1:8001"))
        self.assertFalse(store.is_allowed("https://127.0.0.1:8000"))
        store.revoke("http://127.0.0.1:8000")
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))
        store.path.write_text(json.dumps({"servers": {"http://127.0.0.1:8000": {"allowed": "yes"}}}))
        self.assertFalse(store.is_allowed("http://127.0.0.1:8000"))  # only a literal true is consent
        memory = {}
        backed = lib.ConsentStore(lambda: memory.get("text"), lambda text: memory.__setitem__("text", text))
        backed.allow("http://localhost:8000")
        self.assertEqual(backed.allowed_servers(), ["http://localhost:8000"])

    def test_token_store_keeps_one_token_per_server(self):
        memory = {}
        store = lib.TokenStore(lambda: memory.get("text"), lambda text: memory.__setitem__("text", text))
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

    def test_a_token_that_cannot_be_sent_is_refused_without_showing_it(self):
        for bad in ("two words", "line\nbreak", "accent\u00e9"):
            with self.assertRaises(ValueError) as caught:
                lib.LowDoseClient("http://127.0.0.1:8000", lib.JsonConsentStore(self.folder / "c.json"), token=bad)
            self.assertNotIn(bad, str(caught.exception))
            self.assertIn("copy it again", str(caught.exception))

    def test_the_token_is_in_no_repr_and_no_error_message(self):
        token = "s3cret-token-value"
        client = lib.LowDoseClient("http://127.0.0.1:8000", lib.JsonConsentStore(self.folder / "c.json"), token=token)
        self.assertTrue(client.has_token)
        self.assertNotIn(token, repr(client))
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
            url = "http://127.0.0.1:%d" % listener.getsockname()[1]
            volume = self.folder / "v.nii"
            volume.write_bytes(nifti_header() + bytes(512))
            client = lib.LowDoseClient(url, lib.JsonConsentStore(self.folder / "consent.json"))
            with self.assertRaises(lib.ConsentRequired):
                client.denoise(volume, "denoise_x")
            with self.assertRaises(socket.timeout):
                listener.accept()
        finally:
            listener.close()

    def test_closed_port_is_server_unreachable(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = lib.LowDoseClient("http://127.0.0.1:%d" % port, lib.JsonConsentStore(self.folder / "c.json"))
        with self.assertRaises(lib.ServerUnreachable):
            client.info()

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

    def test_dose_and_table_helpers(self):
        self.assertEqual(lib.parse_dose("1/4"), 0.25)
        self.assertEqual(lib.parse_dose("auto"), "auto")
        self.assertRaises(ValueError, lib.parse_dose, "2")
        for choice in lib.DOSE_CHOICES:
            lib.parse_dose(choice)
        report = {"structures": [
            {"label": 1, "name": "spleen", "verdict": "kept", "reasons": [],
             "images": {"original": {"hu_mean": 50.0, "hu_std": 30.0}, "denoised": {"hu_mean": 51.0, "hu_std": 9.0}},
             "pairs": {"denoised_vs_original": {"dice": 0.97}}},
            {"label": 2, "name": "kidney_right", "verdict": "changed", "reasons": ["Dice 0.60 < 0.80"],
             "images": {"original": {"hu_mean": 30.0, "hu_std": 25.0}, "denoised": {"hu_mean": 90.0, "hu_std": 8.0}},
             "pairs": {"denoised_vs_original": {"dice": 0.6}}},
            {"label": 3, "name": "brain", "verdict": "absent", "reasons": [], "images": {}, "pairs": {}},
        ]}
        rows = lib.fidelity_rows(report)
        self.assertEqual([r["name"] for r in rows], ["kidney_right", "spleen"])
        self.assertTrue(rows[0]["flagged"] and not rows[1]["flagged"])
        self.assertEqual(rows[1]["dice"], 0.97)
        self.assertEqual(lib.fidelity_rows(report, flagged_only=True), rows[:1])
        self.assertEqual(lib.fidelity_label_names(report), {1: "spleen", 2: "kidney_right", 3: "brain"})


def runTest():
    """Entry point when Slicer runs this file."""
    suite = unittest.TestLoader().loadTestsFromTestCase(LowDoseDenoiseLibTest)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()


if __name__ == "__main__":
    unittest.main()
