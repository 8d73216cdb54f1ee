"""Which instructions of a code object lie in a loop, read from its bytecode.

The call-site walk (callsite.py) stops at the first app frame running inside a
loop: the loop is what issued a query's repeats. This module answers, once per
code object, with the (first, last) offsets of each run of such instructions;
the C walk (_speedups.c) reads the same answer from AppFrames' cache.
"""

from __future__ import annotations

import dis
from types import CodeType

_COMPREHENSIONS = frozenset(("<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"))
#: Opcodes with a jump target (3.13 names them ``hasjump``; before, two lists).
_JUMPS = frozenset(
    (*getattr(dis, "hasjump", ()), *getattr(dis, "hasjrel", ()), *getattr(dis, "hasjabs", ()))
)
#: Instructions after which control never reaches the next one.
_NO_FALL_THROUGH = frozenset(
    (
        "RETURN_VALUE",
        "RETURN_CONST",
        "RAISE_VARARGS",
        "RERAISE",
        "JUMP_FORWARD",
        "JUMP_BACKWARD",
        "JUMP_BACKWARD_NO_INTERRUPT",
        "JUMP_ABSOLUTE",
        "JUMP",
        "JUMP_NO_INTERRUPT",
    )
)


def loop_ranges(code: CodeType) -> tuple[tuple[int, int], ...]:
    """(first, last) instruction offsets of each run of instructions that lie on a
    cycle of the code's control flow: a loop's body (``for``, ``async for``,
    ``while``, and from 3.12 an inlined comprehension, PEP 709).

    A cycle, not a backward jump: from 3.11 every ``await`` and ``yield from`` is
    ``SEND, YIELD_VALUE, JUMP_BACKWARD_NO_INTERRUPT`` back to the ``SEND`` (a
    resumption, not a repetition: that jump is taken to go where the ``SEND``
    goes when the awaited is done, so a coroutine suspended in a loop's await
    is in that loop and one outside any is not), and from 3.12 the
    exception paths moved to the end of the code jump back to the code after
    their ``with`` or ``try`` (3.12 with ``JUMP_BACKWARD``, 3.13 with
    ``JUMP_BACKWARD_NO_INTERRUPT``), which a range from the jump's target to
    the jump would take for a loop over everything in between. Exception edges
    count (a handler inside a loop is in the loop; the code after an ``async
    for`` is reached through one). Read once per code object.
    """
    if code.co_name in _COMPREHENSIONS:
        return ((0, len(code.co_code)),)
    instructions = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    if not instructions:
        return ()
    index = {instruction.offset: at for at, instruction in enumerate(instructions)}
    successors: list[list[int]] = [[] for _ in instructions]
    for at, instruction in enumerate(instructions):
        name = instruction.opname
        target = index.get(instruction.argval) if instruction.opcode in _JUMPS else None
        if (
            target is not None
            and name == "JUMP_BACKWARD_NO_INTERRUPT"
            and instructions[target].opname == "SEND"
        ):  # an await resumed: it goes on where its SEND goes when done
            target = index.get(instructions[target].argval)
        if target is not None:
            successors[at].append(target)
        if name not in _NO_FALL_THROUGH and at + 1 < len(instructions):
            successors[at].append(at + 1)
    for entry in getattr(dis.Bytecode(code), "exception_entries", ()):  # 3.11+
        handler = index.get(entry.target)
        if handler is not None:
            for at in range(index.get(entry.start, len(instructions)), len(instructions)):
                if instructions[at].offset >= entry.end:
                    break
                successors[at].append(handler)
    cyclic = _on_cycles(successors)
    ranges: list[tuple[int, int]] = []
    for at, instruction in enumerate(instructions):
        if not cyclic[at]:
            continue
        if ranges and cyclic[at - 1]:
            ranges[-1] = (ranges[-1][0], instruction.offset)
        else:
            ranges.append((instruction.offset, instruction.offset))
    return tuple(ranges)


def _on_cycles(successors: list[list[int]]) -> list[bool]:
    """Whether each node lies on a cycle: Tarjan's strongly connected components,
    iterative (a long function must not hit the recursion limit)."""
    count = len(successors)
    order = [-1] * count
    low = [0] * count
    on_stack = [False] * count
    cyclic = [False] * count
    stack: list[int] = []
    counter = 0
    for root in range(count):
        if order[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            node, edge = work.pop()
            if edge == 0:
                order[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            recurse = False
            edges = successors[node]
            while edge < len(edges):
                nxt = edges[edge]
                edge += 1
                if order[nxt] < 0:
                    work.append((node, edge))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if on_stack[nxt]:
                    low[node] = min(low[node], order[nxt])
            if recurse:
                continue
            if low[node] == order[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in successors[node]:
                    for member in component:
                        cyclic[member] = True
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return cyclic
