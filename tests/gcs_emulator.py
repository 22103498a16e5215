"""gcp-storage-emulator with the response headers of a download that it leaves out and tensorstore
reads: x-goog-generation and x-goog-metageneration. Without them tensorstore cannot tell which
generation of an OCDBT manifest it read, and an orbax save that commits its manifest twice fails
now and then ("Malformed StorageGeneration"). And GCS's ifGenerationMatch=0 precondition on an upload,
which the emulator ignores (insert, below). Started by tests/gcs.py as
`python tests/gcs_emulator.py start --port P --in-memory -q` (the emulator's own command line)."""
import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the original handler has answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


_insert = objects.insert


def insert(request, response, storage, *args, **kwargs):
    """GCS's ifGenerationMatch=0 on an upload: refused with HTTP 412 when the object exists (the emulator
    ignores preconditions; GCS honours them, and the run directory's lock stands on this one)."""
    if request.query.get("ifGenerationMatch") == ["0"]:
        name = request.query["name"][0] if "name" in request.query else None
        if name is None and isinstance(request.data, dict):
            name = request.data.get("meta", {}).get("name")
        try:
            exists = name is not None and storage.get_file_obj(request.params["bucket_name"], name) is not None
        except Exception:  # not found
            exists = False
        if exists:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                                     "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}})
            return
    return _insert(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its route table from objects.*
objects.insert = insert

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main
    sys.exit(main())
