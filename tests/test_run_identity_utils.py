"""The cheap image fingerprint a resume compares, and the clean-up of temporary files left by a killed write."""
import os
import tempfile

from utils.atomic import atomic_write_text, remove_stale_temporaries
from utils.fingerprint import FileFingerprint, files_fingerprint, first_changed_file


def _files(folder, n):
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"img {i}.jpg")
        with open(p, "wb") as f:
            f.write(b"x" * (i + 1))
        paths.append(p)
    return paths


def test_fingerprint_names_the_first_changed_file(tmp_path):
    paths = _files(str(tmp_path), 5)
    saved = FileFingerprint.from_dict(files_fingerprint(paths).to_dict())
    assert first_changed_file(saved, paths) is None
    st = os.stat(paths[3])
    with open(paths[3], "wb") as f:  # same size, other content: the modification time tells
        f.write(b"y" * 4)
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    msg = first_changed_file(saved, paths)
    assert msg is not None and "image 4" in msg and "img 3.jpg" in msg
    assert first_changed_file(saved, paths[:4]) == "5 images then, 4 now"
    os.remove(paths[0])
    assert "image 1" in first_changed_file(saved, paths)


def test_fingerprint_is_four_bytes_per_file(tmp_path):
    paths = _files(str(tmp_path), 7)
    fp = files_fingerprint(paths)
    assert fp.count == 7 and len(fp.codes) == 28 and fp.digest.startswith("sha256:")
    assert files_fingerprint(list(reversed(paths))).digest != fp.digest  # order is the list's order


def test_stale_temporaries_of_atomic_write_are_removed(tmp_path):
    d = str(tmp_path)
    atomic_write_text(os.path.join(d, "last.pth"), "state")
    fd, stale = tempfile.mkstemp(prefix=".last.pth.", suffix=".tmp", dir=d)  # what a kill -9 mid-write leaves
    os.close(fd)
    for keep in (".lock", "notes.tmp", ".hidden"):
        open(os.path.join(d, keep), "w").close()
    assert remove_stale_temporaries(d) == [os.path.basename(stale)]
    assert sorted(os.listdir(d)) == [".hidden", ".lock", "last.pth", "notes.tmp"]
    assert remove_stale_temporaries(os.path.join(d, "missing")) == []
