"""Stable reason codes for rows that did not become images. Renaming one is a breaking change."""

from enum import StrEnum


class Reason(StrEnum):
    # source / transport
    BAD_URL = "bad_url"
    BLOCKED_ADDRESS = "blocked_address"
    DNS_ERROR = "dns_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    REDIRECT_LOOP = "redirect_loop"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    ROBOTS_OPT_OUT = "robots_opt_out"
    TOO_LARGE = "too_large"
    READ_ERROR = "read_error"
    # a listed file whose symlink leads outside the source folder (or the allowed roots)
    OUTSIDE_ROOT = "outside_root"
    # content
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    DECODE_ERROR = "decode_error"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
