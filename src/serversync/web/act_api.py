"""REST routes for appointments, contacts and tasks (``services.act.ActService``).

``/api/v1/activities/{appointments,contacts,tasks}``: list (optionally one owner's), read one
by UID, create, change (PATCH: the given fields over the stored record, validated as a
whole) and delete. The records belong to an application user (``owner``); the ACT channel of
that user's mailbox syncs them with the user's calendar, task list and address book on its
next run (`services.act.ActJob`). Deleted records are tombstoned until that run has deleted
the server copy. Per mailbox: the sync filter (``PUT .../act/filter``) and the conflicts the
sync resolved (``GET .../act/conflicts``).

Every route needs a token; writes need the admin role (`web.deps.caller`). Bad input is
answered in the API's one error format naming the field (`web.act_schemas`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from serversync.core.act import Appointment, Contact, ItemKind, Record, Task
from serversync.core.errors import ConfigError, NotFound
from serversync.core.model import Channel
from serversync.services.act import ActJob, ActService
from serversync.web.act_schemas import (
    ActFilterIn,
    AppointmentIn,
    AppointmentOut,
    ConflictOut,
    ContactIn,
    ContactOut,
    RecordIn,
    TaskIn,
    TaskOut,
    appointment_out,
    conflict_out,
    contact_out,
    editable,
    task_out,
)
from serversync.web.deps import WebContext, caller, context

router = APIRouter(prefix="/api/v1", dependencies=[Depends(caller)])
Ctx = Annotated[WebContext, Depends(context)]
OwnerQuery = Annotated[str | None, Query(max_length=320, description=(
    "only the records of this application user (the owner)"))]
Changes = Annotated[dict[str, Any], Body(description=(
    "the fields to change, as on create; the rest keep their stored values"))]
TAG = "activities"


def _act(ctx: WebContext) -> ActService:
    """The installed ACT service: given by the runtime, or the ACT channel job's own."""
    found = ctx.extras.get("act")
    if isinstance(found, ActService):
        return found
    job = ctx.services.jobs.get(Channel.ACT)
    # Without a job the records can still be read and written; they wait for a sync.
    service = job.service if isinstance(job, ActJob) else ActService(ctx.services.db, {},
                                                                      clock=ctx.clock)
    ctx.extras["act"] = service
    return service


def _validated(model: type[AppointmentIn] | type[ContactIn] | type[TaskIn],
               data: dict[str, Any]) -> RecordIn:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # the same 422 body as a bad request body (web.app's handler names the field)
        raise RequestValidationError(exc.errors()) from None


async def _change(ctx: WebContext, kind: ItemKind, uid: str, changes: dict[str, Any],
                  model: type[AppointmentIn] | type[ContactIn] | type[TaskIn]) -> Record:
    if "uid" in changes and changes["uid"] != uid:
        raise ConfigError("uid", "cannot be changed",
                          fix="create a record with the new UID and delete this one")
    act = _act(ctx)
    current = await act.get(kind, uid)
    body = _validated(model, {**editable(current), **changes, "uid": uid})
    return await act.change(body.to_core())


async def _get(ctx: WebContext, kind: ItemKind, uid: str) -> Record:
    return await _act(ctx).get(kind, uid)


def _appointment(record: Record) -> AppointmentOut:
    if not isinstance(record, Appointment):
        raise NotFound(f"no appointment with UID {record.uid!r}")
    return appointment_out(record)


def _contact(record: Record) -> ContactOut:
    if not isinstance(record, Contact):
        raise NotFound(f"no contact with UID {record.uid!r}")
    return contact_out(record)


def _task(record: Record) -> TaskOut:
    if not isinstance(record, Task):
        raise NotFound(f"no task with UID {record.uid!r}")
    return task_out(record)


# ---------------------------------------------------------------- appointments

@router.get("/activities/appointments", response_model=list[AppointmentOut], tags=[TAG])
async def list_appointments(ctx: Ctx, owner: OwnerQuery = None) -> list[AppointmentOut]:
    """Appointments by UID; ``owner`` narrows to one application user's."""
    found = await _act(ctx).list_records(ItemKind.APPOINTMENT, owner)
    return [_appointment(r) for r in found]


@router.post("/activities/appointments", response_model=AppointmentOut, status_code=201,
             tags=[TAG])
async def create_appointment(ctx: Ctx, body: AppointmentIn) -> AppointmentOut:
    """A new appointment; the owner's ACT channel puts it in their calendar."""
    return _appointment(await _act(ctx).create(body.to_core()))


@router.get("/activities/appointments/{uid:path}", response_model=AppointmentOut, tags=[TAG])
async def get_appointment(ctx: Ctx, uid: str) -> AppointmentOut:
    return _appointment(await _get(ctx, ItemKind.APPOINTMENT, uid))


@router.patch("/activities/appointments/{uid:path}", response_model=AppointmentOut,
              tags=[TAG])
async def change_appointment(ctx: Ctx, uid: str, changes: Changes) -> AppointmentOut:
    """Change fields of an appointment (see the create body for them)."""
    return _appointment(await _change(ctx, ItemKind.APPOINTMENT, uid, changes, AppointmentIn))


@router.delete("/activities/appointments/{uid:path}", status_code=204, tags=[TAG])
async def delete_appointment(ctx: Ctx, uid: str) -> Response:
    """Delete; the next ACT sync deletes the server copy (past appointments stay there)."""
    await _act(ctx).delete(ItemKind.APPOINTMENT, uid)
    return Response(status_code=204)


# ---------------------------------------------------------------- contacts

@router.get("/activities/contacts", response_model=list[ContactOut], tags=[TAG])
async def list_contacts(ctx: Ctx, owner: OwnerQuery = None) -> list[ContactOut]:
    return [_contact(r) for r in await _act(ctx).list_records(ItemKind.CONTACT, owner)]


@router.post("/activities/contacts", response_model=ContactOut, status_code=201, tags=[TAG])
async def create_contact(ctx: Ctx, body: ContactIn) -> ContactOut:
    """A new contact; the owner's ACT channel puts it in their address book."""
    return _contact(await _act(ctx).create(body.to_core()))


@router.get("/activities/contacts/{uid:path}", response_model=ContactOut, tags=[TAG])
async def get_contact(ctx: Ctx, uid: str) -> ContactOut:
    return _contact(await _get(ctx, ItemKind.CONTACT, uid))


@router.patch("/activities/contacts/{uid:path}", response_model=ContactOut, tags=[TAG])
async def change_contact(ctx: Ctx, uid: str, changes: Changes) -> ContactOut:
    """Change fields of a contact (see the create body for them)."""
    return _contact(await _change(ctx, ItemKind.CONTACT, uid, changes, ContactIn))


@router.delete("/activities/contacts/{uid:path}", status_code=204, tags=[TAG])
async def delete_contact(ctx: Ctx, uid: str) -> Response:
    await _act(ctx).delete(ItemKind.CONTACT, uid)
    return Response(status_code=204)


# ---------------------------------------------------------------- tasks

@router.get("/activities/tasks", response_model=list[TaskOut], tags=[TAG])
async def list_tasks(ctx: Ctx, owner: OwnerQuery = None) -> list[TaskOut]:
    return [_task(r) for r in await _act(ctx).list_records(ItemKind.TASK, owner)]


@router.post("/activities/tasks", response_model=TaskOut, status_code=201, tags=[TAG])
async def create_task(ctx: Ctx, body: TaskIn) -> TaskOut:
    """A new task; the owner's ACT channel puts it in their task list."""
    return _task(await _act(ctx).create(body.to_core()))


@router.get("/activities/tasks/{uid:path}", response_model=TaskOut, tags=[TAG])
async def get_task(ctx: Ctx, uid: str) -> TaskOut:
    return _task(await _get(ctx, ItemKind.TASK, uid))


@router.patch("/activities/tasks/{uid:path}", response_model=TaskOut, tags=[TAG])
async def change_task(ctx: Ctx, uid: str, changes: Changes) -> TaskOut:
    """Change fields of a task (see the create body for them)."""
    return _task(await _change(ctx, ItemKind.TASK, uid, changes, TaskIn))


@router.delete("/activities/tasks/{uid:path}", status_code=204, tags=[TAG])
async def delete_task(ctx: Ctx, uid: str) -> Response:
    await _act(ctx).delete(ItemKind.TASK, uid)
    return Response(status_code=204)


# ---------------------------------------------------------------- per mailbox

@router.put("/mailboxes/{address}/act/filter", response_model=ActFilterIn, tags=["mailboxes"])
async def set_act_filter(ctx: Ctx, address: str, body: ActFilterIn) -> ActFilterIn:
    """Which records sync to this mailbox's calendar, address book and task list."""
    await _act(ctx).set_filter(address, body.to_core())
    return body


@router.get("/mailboxes/{address}/act/conflicts", response_model=list[ConflictOut],
            tags=["mailboxes"])
async def act_conflicts(ctx: Ctx, address: str) -> list[ConflictOut]:
    """Conflicts the ACT sync of this mailbox resolved, and how."""
    return [conflict_out(c) for c in await _act(ctx).conflicts(address)]
