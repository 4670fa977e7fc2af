"""The upload client: talks to the gateway over HTTP and to the WebSocket server.

The library API is re-exported here on purpose (``from app.client import
UploadClient``): :class:`~app.client.upload.UploadClient`,
:class:`~app.client.upload.UploadResult`, :class:`~app.client.errors.UploadError`.
The package shares no code with the servers beyond ``app.core``: it speaks the
wire format.

    upload.py    the resumable, parallel upload (UploadClient)
    resume.py    the state files that let a second run resume
    progress.py  the progress bar
    follow.py    ``--follow``: a job's progress over the WebSocket
    command.py   ``sluice upload``: options, output, exit status
"""

from app.client.errors import UploadError
from app.client.upload import UploadClient, UploadResult

__all__ = ["UploadClient", "UploadError", "UploadResult"]
