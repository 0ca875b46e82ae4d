"""The sign-in screens' words in English and Simplified Chinese, and the choice between them.

A small dictionary rather than gettext catalogues: the screens are few, and a
test checks that both languages have every key. The language comes from
``?lang=`` (remembered in the session cookie), else Accept-Language, else English.
"""

from __future__ import annotations

from flask import request
from flask import session as cookie

LANGUAGES = ("en", "zh-CN")

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "app": "metacrm",
        "language": "中文",
        "sign_in": "Sign in",
        "email": "Email",
        "password": "Password",
        "forgot": "Forgot your password?",
        "bad_login": "The email or password is wrong, or sign-in is paused for a while "
        "after too many attempts.",
        "mfa_title": "Two-step sign-in",
        "mfa_help": "Enter the 6-digit code from your authenticator app, or one of your "
        "recovery codes.",
        "code": "Code",
        "verify": "Verify",
        "bad_code": "That code is wrong or was used already.",
        "tenant_title": "Choose a workspace",
        "tenant_help": "You are a member of several workspaces. Choose one to open.",
        "no_tenant": "Your login is not an active member of any workspace. "
        "Ask an administrator to invite you.",
        "open": "Open",
        "ip_refused": "This workspace only accepts sign-ins from its approved networks.",
        "ip_refused_title": "Not from this network",
        "welcome": "Welcome, {name}",
        "signed_in_as": "Signed in as {email}",
        "workspace": "Workspace",
        "roles": "Roles",
        "api_reference": "API reference",
        "switch_tenant": "Switch workspace",
        "security": "Sign-in security",
        "sign_out": "Sign out",
        "back": "Back to {tenant}",
        "mfa_on": "Two-step sign-in is on. Recovery codes left: {left}.",
        "mfa_off": "Two-step sign-in is off.",
        "mfa_required": "{tenant} requires two-step sign-in for your role. Set it up to continue.",
        "mfa_start": "Set up two-step sign-in",
        "mfa_scan": "Scan this code with an authenticator app (for example FreeOTP, "
        "Google Authenticator or Microsoft Authenticator), then enter the 6-digit code it "
        "shows. If you cannot scan, type this key:",
        "mfa_confirm": "Turn on",
        "mfa_enabled": "Two-step sign-in is on.",
        "recovery_title": "Your recovery codes",
        "recovery_help": "Each code signs you in once if you lose your phone. Store them "
        "somewhere safe now: they are not shown again.",
        "done": "Done",
        "mfa_disable": "Turn off two-step sign-in",
        "mfa_disable_help": "Confirm with your password and a current code.",
        "mfa_disabled": "Two-step sign-in is off.",
        "mfa_still_required": "Your workspace requires two-step sign-in; it cannot be turned off.",
        "new_recovery": "New recovery codes",
        "new_recovery_help": "Replace your recovery codes (the old ones stop working). "
        "Confirm with your password and a current code.",
        "change_password": "Change password",
        "current_password": "Current password",
        "new_password": "New password",
        "confirm_password": "New password again",
        "policy": "At least 10 characters; not a common password; not your email name.",
        "password_changed": "Your password is changed. Other browsers were signed out.",
        "wrong_password": "The current password is wrong.",
        "mismatch": "The two new passwords differ.",
        "weak_password": "The new password {problem}.",
        "form_expired_title": "Please try again",
        "form_expired": "The form expired or did not come from this site. Go back, reload "
        "the page and try again.",
        "signed_out": "You are signed out.",
        "not_found_title": "Not found",
        "not_found": "There is no such workspace, or you are not signed in to it.",
        "tokens": "API tokens",
        "tokens_help": "A token lets a script use the API as you, within your roles. "
        "Its secret is shown once, when it is created.",
        "token_new": "New token",
        "token_name": "Name",
        "token_read_only": "Read-only (cannot create, change or delete)",
        "token_entities": "Limit to these entities (none ticked: every entity you may read)",
        "token_days": "Expires after (days, empty: never)",
        "token_create": "Create token",
        "token_created": "Token “{name}” created. Copy its secret now: it will not be shown again.",
        "token_revoke": "Revoke",
        "token_revoked": "Token “{name}” revoked; it no longer works.",
        "token_none": "You have no API tokens in this workspace.",
        "token_access": "Access",
        "token_rw": "read and write",
        "token_ro": "read-only",
        "token_scope": "Entities",
        "token_all": "all",
        "token_made": "Created",
        "token_expires": "Expires",
        "token_never": "never",
        "token_used": "Last used",
        "token_unused": "not yet",
        "token_state": "State",
        "token_active": "active",
        "token_expired": "expired",
        "token_revoked_state": "revoked {when}",
        "token_bad_name": "The name must be 1 to {max} characters long, without control "
        "characters.",
        "token_bad_entity": "“{entity}” is not an entity you may read here.",
        "token_bad_entities": "Choose at most {max} entities.",
        "token_bad_days": "The lifetime must be a whole number of days from 1 to {max}, or empty.",
        "token_not_created": "The token was not created.",
        "not_your_token": "You have no such token in this workspace.",
        "sessions_note": "Changing your password or two-step sign-in signs out every other "
        "browser.",
    },
    "zh-CN": {
        "app": "metacrm",
        "language": "English",
        "sign_in": "登录",
        "email": "邮箱",
        "password": "密码",
        "forgot": "忘记密码？",
        "bad_login": "邮箱或密码错误，或因尝试次数过多，登录已暂停一段时间。",
        "mfa_title": "两步验证",
        "mfa_help": "请输入身份验证器应用中的 6 位验证码，或一个恢复码。",
        "code": "验证码",
        "verify": "验证",
        "bad_code": "验证码错误或已被使用。",
        "tenant_title": "选择工作区",
        "tenant_help": "您是多个工作区的成员，请选择要打开的工作区。",
        "no_tenant": "您的账号不是任何工作区的有效成员。请联系管理员邀请您。",
        "open": "打开",
        "ip_refused": "此工作区只接受来自其批准网络的登录。",
        "ip_refused_title": "网络不被允许",
        "welcome": "欢迎，{name}",
        "signed_in_as": "当前登录：{email}",
        "workspace": "工作区",
        "roles": "角色",
        "api_reference": "API 参考",
        "switch_tenant": "切换工作区",
        "security": "登录安全",
        "sign_out": "退出登录",
        "back": "返回 {tenant}",
        "mfa_on": "两步验证已开启。剩余恢复码：{left} 个。",
        "mfa_off": "两步验证未开启。",
        "mfa_required": "{tenant} 要求您的角色开启两步验证。请先完成设置。",
        "mfa_start": "设置两步验证",
        "mfa_scan": "请用身份验证器应用（如 FreeOTP、Google 身份验证器或 Microsoft "
        "Authenticator）扫描此二维码，然后输入其显示的 6 位验证码。无法扫描时，请输入此密钥：",
        "mfa_confirm": "开启",
        "mfa_enabled": "两步验证已开启。",
        "recovery_title": "您的恢复码",
        "recovery_help": "手机丢失时，每个恢复码可登录一次。请立即妥善保存：它们不会再次显示。",
        "done": "完成",
        "mfa_disable": "关闭两步验证",
        "mfa_disable_help": "请输入密码和当前验证码确认。",
        "mfa_disabled": "两步验证已关闭。",
        "mfa_still_required": "您的工作区要求两步验证，无法关闭。",
        "new_recovery": "生成新的恢复码",
        "new_recovery_help": "更换恢复码（旧恢复码将失效）。请输入密码和当前验证码确认。",
        "change_password": "修改密码",
        "current_password": "当前密码",
        "new_password": "新密码",
        "confirm_password": "再次输入新密码",
        "policy": "至少 10 个字符；不能是常见密码；不能包含邮箱用户名。",
        "password_changed": "密码已修改，其他浏览器已退出登录。",
        "wrong_password": "当前密码错误。",
        "mismatch": "两次输入的新密码不一致。",
        "weak_password": "新密码不符合要求：{problem}。",
        "form_expired_title": "请重试",
        "form_expired": "表单已过期或并非来自本站。请返回、刷新页面后重试。",
        "signed_out": "您已退出登录。",
        "not_found_title": "未找到",
        "not_found": "没有这个工作区，或您未登录到该工作区。",
        "tokens": "API 令牌",
        "tokens_help": "令牌让脚本以您的身份、在您的角色权限内调用 API。"
        "令牌密钥只在创建时显示一次。",
        "token_new": "新建令牌",
        "token_name": "名称",
        "token_read_only": "只读（不能新建、修改或删除）",
        "token_entities": "仅限这些实体（都不勾选：您可读取的全部实体）",
        "token_days": "有效天数（留空：永不过期）",
        "token_create": "创建令牌",
        "token_created": "已创建令牌“{name}”。请立即复制密钥：之后不会再显示。",
        "token_revoke": "吊销",
        "token_revoked": "已吊销令牌“{name}”，它已失效。",
        "token_none": "您在此工作区没有 API 令牌。",
        "token_access": "权限",
        "token_rw": "读写",
        "token_ro": "只读",
        "token_scope": "实体",
        "token_all": "全部",
        "token_made": "创建时间",
        "token_expires": "过期时间",
        "token_never": "永不",
        "token_used": "最近使用",
        "token_unused": "尚未使用",
        "token_state": "状态",
        "token_active": "有效",
        "token_expired": "已过期",
        "token_revoked_state": "已于 {when} 吊销",
        "token_bad_name": "名称须为 1 到 {max} 个字符，且不能包含控制字符。",
        "token_bad_entity": "“{entity}”不是您在此可读取的实体。",
        "token_bad_entities": "最多选择 {max} 个实体。",
        "token_bad_days": "有效期须为 1 到 {max} 之间的整数天，或留空。",
        "token_not_created": "令牌未创建。",
        "not_your_token": "您在此工作区没有这个令牌。",
        "sessions_note": "修改密码或两步验证设置后，其他浏览器都会退出登录。",
    },
}


def language() -> str:
    """Return the request's language: ?lang=, then the remembered choice, then the browser's."""
    asked = request.args.get("lang")
    if asked in LANGUAGES:
        cookie["lang"] = asked
        return asked
    remembered = cookie.get("lang")
    if remembered in LANGUAGES:
        return remembered
    best = request.accept_languages.best_match(["en", "zh-CN", "zh"], default="en")
    return "zh-CN" if best.lower().startswith("zh") else "en"


def strings(lang: str) -> dict[str, str]:
    """Return the words of one language."""
    return TEXT[lang]
