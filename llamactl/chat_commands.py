"""``llamactl chat`` and ``llamactl history``: talking to models, finding old talks."""

from __future__ import annotations

import argparse
import functools
import os
import stat
import sys
import time
from pathlib import Path
from typing import NamedTuple

from llamactl.client import Client, ClientError, RequestFailed
from llamactl.output import StateLines, print_json
from llamad.protocol import (
    ApproveTool,
    Cancel,
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    ContextTrimmed,
    Conversation,
    ConversationReply,
    Conversations,
    DeleteConversation,
    Error,
    ExportConversation,
    Exported,
    GetConversation,
    ImagePart,
    ListConversations,
    Message,
    Ok,
    Part,
    QueuePosition,
    RenameConversation,
    SearchHistory,
    SearchResults,
    StateChanged,
    TextPart,
    ToolCall,
    ToolCallEvent,
    conversation_handle,
    read_image_file,
)


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    reading: argparse.ArgumentParser,
) -> None:
    chat = commands.add_parser(
        "chat",
        parents=[common],
        help="send a message and stream the reply",
        description="Send a message and stream the reply. Text piped in is sent too, before "
        "the message (`cat notes.txt | llamactl chat 'summarise this'`). With no message "
        "on a terminal: a chat, line by line (Ctrl+C stops a reply, Ctrl+D leaves).",
    )
    chat.add_argument(
        "prompt", nargs="?", help="the message (default: standard input, or a chat on a terminal)"
    )
    chat.add_argument("-m", "--model", help="model to use (loaded first if needed)")
    which = chat.add_mutually_exclusive_group()
    which.add_argument(
        "-c", "--conversation", metavar="ID", help="continue a conversation (handle or id prefix)"
    )
    which.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="continue the most recent conversation",
    )
    which.add_argument("--new", action="store_true", help="start a new conversation (default)")
    chat.add_argument("-s", "--system", help="system prompt for a new conversation")
    chat.add_argument("-t", "--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int)
    chat.add_argument("-v", "--verbose", action="store_true", help="stats on stderr")
    chat.add_argument(
        "-i",
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="attach an image (PNG, JPEG, WebP, GIF; repeatable; needs a vision model)",
    )
    chat.add_argument(
        "--tools",
        metavar="LIST",
        help="tools to offer, comma-separated, or 'none' (default: the model's own list)",
    )
    chat.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="approve tool calls that ask for confirmation without asking",
    )

    history = commands.add_parser(
        "history",
        help="stored conversations",
        description="Stored conversations. A conversation is named by its handle "
        "(`history list` shows it) or by a unique prefix of its id.",
    )
    actions = history.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[reading], help="newest first")
    listing.add_argument("-n", "--limit", type=int, default=20)
    show = actions.add_parser("show", parents=[reading], help="a conversation's messages")
    show.add_argument("id", help="conversation id or a unique prefix")
    show.add_argument("-n", "--limit", type=int, default=100)
    search = actions.add_parser(
        "search", parents=[reading], help="find text in every message (exit 1: none found)"
    )
    search.add_argument("text")
    search.add_argument("-n", "--limit", type=int, default=50)
    export = actions.add_parser("export", parents=[common], help="Markdown or JSON to stdout")
    export.add_argument("id")
    export.add_argument("--format", choices=("md", "json"), default="md")
    rename = actions.add_parser("rename", parents=[common], help="give a conversation a title")
    rename.add_argument("id")
    rename.add_argument("title")
    delete = actions.add_parser("delete", parents=[common], help="delete a conversation")
    delete.add_argument("id")


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None and sys.stdin.isatty():
        from llamactl.chat_loop import run_chat_loop

        return run_chat_loop(client, args)
    piped = _piped_input() if prompt is not None else sys.stdin.read()
    if prompt is None:
        prompt = piped or ""
    elif piped and piped.strip():
        # As other command-line chat tools do: the piped text, then the instruction.
        prompt = f"{piped.rstrip()}\n\n{prompt}"
    content: str | list[Part] = prompt
    if args.image:
        content = [TextPart(text=prompt), *(_read_image(Path(path)) for path in args.image)]
    client.set_timeout(None)  # a model may take minutes to load or to answer
    reply = exchange(client, args, content, resolve_conversation(client, args))
    return finish(reply.message, args.verbose, reply.handle)


def _piped_input() -> str | None:
    """Standard input when it is a pipe or a file; None for a terminal, /dev/null, a socket."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
        return sys.stdin.read()
    return None


def resolve_conversation(client: Client, args: argparse.Namespace) -> str | None:
    """The conversation a chat continues: ``-c``, the newest with ``--continue``, or none."""
    if not getattr(args, "resume", False):
        return args.conversation  # type: ignore[no-any-return]
    newest = client.call(lambda i: ListConversations(id=i, limit=1))
    assert isinstance(newest, Conversations)
    if not newest.conversations:
        raise ClientError('no conversation to continue yet; start one with `llamactl chat "hello"`')
    return newest.conversations[0].id


def chat_options(args: argparse.Namespace) -> ChatOptions:
    tools = None
    if args.tools is not None:
        tools = [t.strip() for t in args.tools.split(",") if t.strip() and t.strip() != "none"]
    return ChatOptions(
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        system=args.system,
        seed=args.seed,
        tools=tools,
    )


class Reply(NamedTuple):  # not a dataclass: that import (with inspect) costs ~5 ms a run
    message: Message
    handle: str  # the conversation's


def exchange(
    client: Client,
    args: argparse.Namespace,
    content: str | list[Part],
    conversation: str | None,
    *,
    interrupted_quits: bool = True,
) -> Reply:
    """Send one message and stream its reply to stdout; the stored reply.

    Ctrl+C stops the generation (what came is kept); a second one quits
    (``KeyboardInterrupt``). With ``interrupted_quits`` so does a first one
    that comes before llamad acknowledged the message; without (the chat
    loop), that reply is stopped as soon as it starts.
    """
    request_id = client.send(
        lambda i: Chat(
            id=i,
            content=content,
            conversation=conversation,
            model=args.model,
            options=chat_options(args),
        )
    )
    started: str | None = None
    handle = ""
    interrupted = False
    wrote_text = False
    states = StateLines()
    while True:
        try:
            message = client.receive_for(request_id)
        except KeyboardInterrupt:
            if interrupted or (started is None and interrupted_quits):
                raise
            interrupted = True  # first Ctrl+C: stop the generation, keep what came
            if started is not None:
                client.send(functools.partial(_cancel, conversation=started))
            continue
        match message:
            case ChatStarted(conversation=stored):
                started, handle = stored.id, stored.handle
                if interrupted:  # Ctrl+C came before llamad had stored the message
                    client.send(functools.partial(_cancel, conversation=started))
            case ChatDelta(text=text):
                sys.stdout.write(text)
                sys.stdout.flush()
                wrote_text = True
            case StateChanged(model=status):
                states.show(status)
            case QueuePosition(position=position):
                print(f"waiting for a free slot: position {position}", file=sys.stderr)
            case ToolCallEvent(conversation=where, call=call):
                if call.status == "awaiting_approval":
                    approve = args.yes or _ask_approval(call)
                    client.send(functools.partial(_approval, where, call.id, approve))
                elif call.status != "running":
                    if wrote_text:
                        sys.stdout.write("\n")
                        wrote_text = False
                    print(f"▸ {call.summary()}", file=sys.stderr)
            case ContextTrimmed(dropped_turns=dropped):
                print(
                    f"note: left out the {dropped} oldest turns to fit the context", file=sys.stderr
                )
            case ChatDone(message=reply):
                if wrote_text:
                    sys.stdout.write("\n")
                return Reply(reply, handle or conversation_handle(reply.conversation))
            case Error():
                raise RequestFailed(message)
            case _:
                pass


def _cancel(request_id: int, conversation: str) -> Cancel:
    return Cancel(id=request_id, conversation=conversation)


def _approval(conversation: str, call: str, approve: bool, request_id: int) -> ApproveTool:
    return ApproveTool(id=request_id, conversation=conversation, call=call, approve=approve)


def _ask_approval(call: ToolCall) -> bool:
    """Ask on the terminal; with none (a script, a pipe) the call is denied."""
    question = f"allow {call.summary().split(' → ')[0]}? [y/N] "
    try:
        with open("/dev/tty", "r+") as tty:
            tty.write(question)
            tty.flush()
            return tty.readline().strip().lower() in ("y", "yes")
    except OSError:
        print(f"denied {call.name}: no terminal to ask (use --yes to allow)", file=sys.stderr)
        return False


def _read_image(path: Path) -> ImagePart:
    try:
        return read_image_file(path)
    except ValueError as exc:
        raise ClientError(str(exc)) from None


def finish(reply: Message, verbose: bool, handle: str) -> int:
    if verbose:
        stats = reply.stats
        parts = [reply.model or "?", reply.status, f"conversation {handle or reply.conversation}"]
        if stats is not None:
            if stats.completion_tokens is not None:
                parts.append(f"{stats.completion_tokens} tokens")
            if stats.tokens_per_second is not None:
                parts.append(f"{stats.tokens_per_second:.0f} tokens/s")
            if stats.time_to_first_token_ms is not None:
                parts.append(f"first token {stats.time_to_first_token_ms:.0f} ms")
            if stats.finish_reason:
                parts.append(f"finish {stats.finish_reason}")
        print("[" + " · ".join(parts) + "]", file=sys.stderr)
    if reply.status == "error":
        print(f"llamactl: {reply.error}", file=sys.stderr)
        return 1
    if reply.status == "cancelled":
        print("(cancelled; the partial reply is kept)", file=sys.stderr)
        return 130
    return 0


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _conversation_line(conversation: Conversation) -> str:
    model = conversation.model or "-"
    handle = conversation.handle or conversation_handle(conversation.id)
    return (
        f"{handle}  {_when(conversation.updated)}  "
        f"{conversation.message_count:>4} msgs  {model:<10}  {conversation.title}"
    )


def cmd_history(client: Client, args: argparse.Namespace) -> int:
    match args.action:
        case "list":
            reply = client.call(lambda i: ListConversations(id=i, limit=args.limit))
            assert isinstance(reply, Conversations)
            if args.json:
                print_json(reply.conversations)
            elif not reply.conversations:
                print('no conversations yet; start one with `llamactl chat "hello"`')
            for conversation in [] if args.json else reply.conversations:
                print(_conversation_line(conversation))
        case "show":
            shown = client.call(
                lambda i: GetConversation(id=i, conversation=args.id, limit=args.limit)
            )
            assert isinstance(shown, ConversationReply)
            if args.json:
                print_json(shown)
                return 0
            conversation = shown.conversation
            handle = conversation.handle or conversation_handle(conversation.id)
            print(f"# {conversation.title or '(untitled)'}  [{handle} · {conversation.id}]")
            if shown.more:
                print("(older messages not shown; use -n to see more)")
            for message in shown.messages:
                status = "" if message.status == "complete" else f" [{message.status}]"
                model = (
                    f" ({message.model})" if message.model and message.role == "assistant" else ""
                )
                print(f"\n{message.role}{model}{status}:")
                for call in message.tool_calls:
                    print(f"▸ {call.summary()}")
                for image in message.images:
                    print(image.label())
                if message.text or not (message.tool_calls or message.images):
                    print(message.text if message.text else "(empty)")
                if message.error:
                    print(f"error: {message.error}")
        case "search":
            found = client.call(lambda i: SearchHistory(id=i, text=args.text, limit=args.limit))
            assert isinstance(found, SearchResults)
            if args.json:
                print_json(found.hits)
            elif not found.hits:
                print(f"no message contains {args.text!r}", file=sys.stderr)
            for hit in [] if args.json else found.hits:
                handle = conversation_handle(hit.conversation)
                print(f"{handle}  #{hit.seq:<4} {hit.role:<9} {hit.snippet}")
            if not found.hits:
                return 1  # as grep does, so that scripts can tell
        case "export":
            exported = client.call(
                lambda i: ExportConversation(id=i, conversation=args.id, format=args.format)
            )
            assert isinstance(exported, Exported)
            sys.stdout.write(
                exported.content if exported.content.endswith("\n") else exported.content + "\n"
            )
        case "rename":
            done = client.call(
                lambda i: RenameConversation(id=i, conversation=args.id, title=args.title)
            )
            assert isinstance(done, Ok)
            print(done.message)
        case "delete":
            done = client.call(lambda i: DeleteConversation(id=i, conversation=args.id))
            assert isinstance(done, Ok)
            print(done.message)
        case _:
            raise ClientError(f"unknown history action {args.action!r}")
    return 0
