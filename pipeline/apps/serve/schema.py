"""The OpenAI chat-completions request as typed models, and the conversation it holds in the model's terms.

Field types are strict (a string where a number belongs is refused, not converted), unknown fields are
refused by name, and `to_conversation` checks what a type cannot express: the order of roles and the
number of images and videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# where an image (a video) part stands in a message's text
from pipeline.families.base import IMAGE_TAG, VIDEO_TAG

MAX_STOP_SEQUENCES = 4  # as OpenAI


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP code, the message says what is wrong."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; slicing decides


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    """A video, as vLLM's OpenAI-compatible server takes it: a data:video/...;base64, URL or an http(s) URL."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    user: str | None = None  # an end-user id, only logged


@dataclass
class Conversation:
    """A request's conversation: its system text, its turns' text ([query, response] pairs and the last query,
    text parts joined by newlines), the messages after the system one with an <image> (<video>) tag where each
    image (video) part stood, and the image and video URLs in order."""

    system: str | None
    history: list[list[str]]
    query: str
    messages: list[dict[str, str]]
    image_urls: list[str]
    video_urls: list[str] = field(default_factory=list)

    def chat_messages(self, system: str | None, image_placement: str) -> list[dict[str, str]]:
        """Returns the messages a family encodes (Family.encode_chat), the system message first when there is
        one: with an <image> tag where each image part stood ("inline" placement), or the turns' text alone,
        the family placing the images at the start of the first query ("first_query")."""
        head = [{"role": "system", "content": system}] if system else []
        if image_placement == "inline":
            return head + [dict(message) for message in self.messages]
        for query, response in self.history:
            head += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return head + [{"role": "user", "content": self.query}]


def _text_of(content: str | list, where: str, allow_media: bool) -> tuple[str, list[str], list[str], str]:
    """Returns the text of a message's content (text parts joined by newlines), its image URLs, its video
    URLs, and its text with an <image> (<video>) tag in place of each image (video) part (a tag joins its
    neighbours without a newline)."""
    if isinstance(content, str):
        return content, [], [], content
    texts, images, videos, tagged = [], [], [], ""
    previous_text = False
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
            tagged += ("\n" if previous_text else "") + part.text
            previous_text = True
            continue
        if not allow_media:
            raise RequestError(f"{where}: only user messages may hold images and videos", param=where)
        if isinstance(part, VideoPart):
            videos.append(part.video_url.url)
            tagged += VIDEO_TAG
        else:
            images.append(part.image_url.url)
            tagged += IMAGE_TAG
        previous_text = False
    return "\n".join(texts), images, videos, tagged


def _too_many_images(model: str, max_images: int, found: int) -> RequestError:
    limit = "one image" if max_images == 1 else f"at most {max_images} images"
    return RequestError(
        f"{model} takes {limit} per conversation; the messages hold {found} images",
        param="messages",
        code="too_many_images",
    )


def _too_many_videos(model: str, max_videos: int, found: int) -> RequestError:
    limit = (
        "no video" if max_videos == 0 else "one video" if max_videos == 1 else f"at most {max_videos} videos"
    )
    return RequestError(
        f"{model} takes {limit} per conversation; the messages hold {found} video(s)",
        param="messages",
        code="too_many_videos",
    )


def to_conversation(
    request: ChatCompletionRequest, max_images: int, model: str, max_videos: int = 0
) -> Conversation:
    """Returns the conversation of `request`; raises RequestError when the roles, images or videos do not fit
    the model (`model` names it in the error, `max_images` and `max_videos` are its limits).

    Accepted: an optional system message first, then user and assistant messages alternating, ending with
    a user message; at most `max_images` images and `max_videos` videos in all.
    """
    messages = list(request.messages)
    system = None
    tagged: list[dict[str, str]] = []
    if messages[0].role == "system":
        system, _, _, _ = _text_of(messages[0].content, "messages[0]", allow_media=False)
        messages = messages[1:]
        offset = 1
    else:
        offset = 0
    if not messages:
        raise RequestError("messages holds only a system message; add a user message", param="messages")
    turns: list[str] = []
    images: list[str] = []
    videos: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i + offset}]"
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise RequestError(
                f"{where} has role {message.role!r} where {expected!r} belongs: after an optional first "
                "system message, user and assistant messages alternate, starting and ending with user",
                param=where,
            )
        text, found, found_videos, with_tags = _text_of(message.content, where, message.role == "user")
        if message.role == "user" and not text.strip():
            raise RequestError(f"{where}: a user message needs some text", param=where)
        turns.append(text)
        tagged.append({"role": message.role, "content": with_tags})
        images += found
        videos += found_videos
    if len(turns) % 2 == 0:
        raise RequestError(
            f"messages[{len(request.messages) - 1}] is an assistant message; the last message must be "
            "the user's",
            param="messages",
        )
    if len(images) > max_images:
        raise _too_many_images(model, max_images, len(images))
    if len(videos) > max_videos:
        raise _too_many_videos(model, max_videos, len(videos))
    history = [[turns[j], turns[j + 1]] for j in range(0, len(turns) - 1, 2)]
    return Conversation(
        system=system,
        history=history,
        query=turns[-1],
        messages=tagged,
        image_urls=images,
        video_urls=videos,
    )


def stop_sequences(request: ChatCompletionRequest) -> list[str]:
    """Returns the request's stop strings (empty ones dropped); raises RequestError for more than four."""
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"stop holds {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are accepted", param="stop"
        )
    return [s for s in stop if s]


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """Returns the JSON body of an error, in OpenAI's shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_PART_TAGS = ("text", "image_url", "video_url")
_CONTENT_TYPES = (
    'a string or a list of parts ({"type": "text", "text": ...}, {"type": "image_url", ...} or '
    '{"type": "video_url", ...})'
)


def _location(loc: tuple) -> list[str]:
    """Returns the field path of an error, without pydantic's union branch names and part tags."""
    out: list[str] = []
    in_parts = False
    previous = None
    for part in loc:
        part = str(part)
        if part == "body" and not out:
            continue
        if part == "str" or "[" in part:  # the union's branch names (str, list[...]) say nothing to a client
            in_parts = part.startswith("list[")
            previous = part
            continue
        if in_parts and previous is not None and previous.isdigit() and part in _PART_TAGS:
            previous = None  # the tag a content part was matched by, not a field
            continue
        out.append(part)
        previous = part
    return out


_SEND_JSON = "send a JSON object with a messages list and the header 'Content-Type: application/json'"
_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _whole_body_error(error: dict, content_type: str | None) -> str | None:
    """Returns the message for an error about the body as a whole (empty, not JSON, not an object), else None."""
    if tuple(error.get("loc", ())) != ("body",):
        return None
    if error.get("type") == "missing":
        return f"the request body is empty: {_SEND_JSON}"
    value = error.get("input")
    if isinstance(value, (bytes, bytearray)):  # a body not sent as JSON is not parsed as JSON
        sent = f"Content-Type: {content_type}" if content_type else "no Content-Type"
        return f"the request body was not read as JSON (it came with {sent}): {_SEND_JSON}"
    if type(value) in _JSON_TYPES:
        return f"invalid request: the body is {_JSON_TYPES[type(value)]}, not a JSON object: {_SEND_JSON}"
    return None


def describe_validation_errors(errors: list[dict], content_type: str | None = None) -> tuple[str, str | None]:
    """Returns one message naming every field at fault (and the first field), from pydantic's error list;
    `content_type` is the request's header, named when the body was not sent as JSON."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            return f"the request body is not valid JSON: {ctx.get('error', error.get('msg'))}", None
        whole = _whole_body_error(error, content_type)
        if whole is not None:
            return whole, None
        loc = _location(tuple(error.get("loc", ())))
        where = _dotted(loc) or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "is not a known field"
        elif loc and loc[-1] == "content" and error.get("type") in ("string_type", "list_type"):
            deeper = any(_dotted(_location(tuple(e.get("loc", ())))).startswith(where + "[") for e in errors)
            if deeper:
                continue  # a list was sent: its own errors say what is wrong in it
            message = f"must be {_CONTENT_TYPES}"
        parts.append(f"{where}: {message}")
    unique = list(dict.fromkeys(parts))
    first = unique[0].split(":", 1)[0] if unique else None
    return "invalid request: " + "; ".join(unique[:6]), first


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
