#!/usr/local/bin/python
"""Container entrypoint: make the data volume writable by the unprivileged `shim` user, then run
the command as that user (exec: the command becomes PID 1 and receives SIGTERM itself).

Platform volumes (Fly volumes, bind mounts) are usually owned by root, whatever the image's
/data was; Docker named volumes inherit the image's ownership. Started as a non-root user (e.g.
`docker run --user`), it changes nothing and just execs the command."""

import os
import pwd
import sys

USER = os.environ.get("SHIM_USER", "shim")  # the image's unprivileged user


def main() -> None:
    command = sys.argv[1:] or ["shim", "serve", "--host", "0.0.0.0"]
    if os.getuid() == 0:
        account = pwd.getpwnam(USER)
        data = os.environ.get("SHIM_DATA_DIR", "/data")
        os.makedirs(data, exist_ok=True)
        if os.stat(data).st_uid != account.pw_uid:
            os.chown(data, account.pw_uid, account.pw_gid)
        os.setgroups([])
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)  # irrevocable: the service never runs as root
        os.environ["HOME"] = account.pw_dir
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
