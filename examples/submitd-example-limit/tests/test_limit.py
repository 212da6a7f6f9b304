import pytest

from submitd.testing import SMTPRefused, send_mail, wait_for_delivery


@pytest.fixture
def submitd_settings():
    return {"enable": ["example_limit"], "plugins": {"example_limit": {"max_recipients": 2}}}


async def test_third_recipient_is_refused(submitd_server, submitd_user, submitd_maildir):
    u, body = submitd_user, "Subject: hi\r\n\r\nHello\r\n"
    await send_mail(submitd_server, u.login, u.password, u.sender, ["a@x.example"], body)
    assert (await wait_for_delivery(submitd_maildir))[0]["Subject"] == "hi"
    with pytest.raises(SMTPRefused) as refused:
        await send_mail(submitd_server, u.login, u.password, u.sender,
                        ["a@x.example", "b@x.example", "c@x.example"], body)
    assert (refused.value.reply.code, refused.value.reply.status) == (452, "4.5.3")
    assert refused.value.recipient == "c@x.example"
