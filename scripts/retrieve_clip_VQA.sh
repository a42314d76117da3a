#!/usr/bin/env bash
# The original script's name: same as retrieve_clip_vqa.sh.
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/retrieve_clip_vqa.sh" "$@"
