"""gcp-storage-emulator with the response headers of a download that it leaves out and tensorstore
reads: x-goog-generation and x-goog-metageneration. Without them tensorstore cannot tell which
generation of an OCDBT manifest it read, and an orbax save that commits its manifest twice fails
now and then ("Malformed StorageGeneration"). Started by tests/gcs.py as
`python tests/gcs_emulator.py start --port P --in-memory -q` (the emulator's own command line)."""
import sys

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


objects.download = download  # before the server module builds its route table from objects.*

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main
    sys.exit(main())
