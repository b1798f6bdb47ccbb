"""`python tests/gcs_emulator.py start ...`: gcp-storage-emulator whose downloads carry the object's
generation (`x-goog-generation`), as Cloud Storage's do. TensorStore (orbax's arrays) reads it to
write a checkpoint's database conditionally; without it a save that commits more than once fails
with "Malformed StorageGeneration"."""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

plain_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(stored["generation"])
    response["x-goog-metageneration"] = str(stored.get("metageneration", 1))
  except Exception:  # pylint: disable=broad-except  (no such object: the plain handler answers)
    pass
  return plain_download(request, response, storage, *args, **kwargs)


objects.download = download  # what the JSON API's `alt=media` reads call
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is plain_download:
      methods[method] = download

if __name__ == "__main__":
  sys.exit(main())
