# The NixOS options the modules under test read or set, declared with
# nixpkgs' real `lib.types`, with the types, defaults, `apply` functions
# and assertions of nixpkgs 26.05 where they matter, and the accounts NixOS
# itself declares (root, nobody; groups root, wheel, users, nogroup).
# Everything else in a NixOS system is left out: a module that touches
# an option not declared here fails to evaluate, as it would on NixOS if
# the option did not exist.  The scripted stage 1's options (stage-1.nix)
# are in scripted-initrd-options.nix, which eval.nix leaves out to stand
# for a nixpkgs that no longer has them.
#
# Where each fact comes from (files of nixpkgs' nixos/ tree; the facts
# written from knowledge of those files, see docs/nixos.md "The tests"):
#   - systemd unit options (unitOption's merge, unitNameType, checkService,
#     the unitConfig module turning after/before/... into [Unit] keys):
#     lib/systemd-unit-options.nix, lib/systemd-lib.nix, lib/systemd-types.nix;
#   - boot.initrd.systemd.* (enable defaults to true since 26.05, storePaths
#     coerced to a submodule, contents): modules/system/boot/systemd/initrd.nix;
#   - system.activationScripts and its `apply` (the whole script under
#     `.script`): modules/system/activation/activation-script.nix;
#   - fileSystems.<name>.enable and its filter: modules/tasks/filesystems.nix;
#   - users.users / users.groups and their assertions, the `users` snippet
#     being empty under userborn or systemd-sysusers:
#     modules/config/users-groups.nix;
#   - services.userborn and userborn.service: modules/services/system/userborn.nix;
#   - systemd.sysusers and systemd-sysusers.service:
#     modules/system/boot/systemd/sysusers.nix.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkDefault mkIf types;

  # ---- systemd units (lib/systemd-unit-options.nix, lib/systemd-lib.nix) ----

  # One [Unit]/[Service] value: a list among the definitions makes all of
  # them one list; otherwise every definition must be equal.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if lib.any (def: lib.isList def.value) defs'
      then lib.concatMap (def: lib.toList def.value) defs'
      else lib.mergeEqualOption loc defs';
  };

  unitNameType = types.strMatching
    "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  assertValueOneOf = name: values: group: attr:
    lib.optional (attr ? ${name} && !lib.elem attr.${name} values)
      "Systemd ${group} field `${name}' cannot have value `${toString attr.${name}}'.";

  checkUnitConfig = group: checks: attrs:
    let
      defs = lib.mapAttrs (_: v:
        if v._type or "" == "override" || v._type or "" == "if" then v.content else v) attrs;
      errors = lib.concatMap (c: c group defs) checks;
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  checkService = checkUnitConfig "Service" [
    (assertValueOneOf "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ])
    (assertValueOneOf "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ])
  ];

  unitList = mkOption { type = types.listOf unitNameType; default = [ ]; };

  commonUnitOptions = {
    enable = mkOption { type = types.bool; default = true; };
    description = mkOption { type = types.singleLineStr; default = ""; };
    documentation = mkOption { type = types.listOf types.str; default = [ ]; };
    requires = unitList;
    wants = unitList;
    upholds = unitList;
    after = unitList;
    before = unitList;
    bindsTo = unitList;
    partOf = unitList;
    conflicts = unitList;
    requisite = unitList;
    onFailure = unitList;
    onSuccess = unitList;
    wantedBy = unitList;
    requiredBy = unitList;
    upheldBy = unitList;
    aliases = unitList;
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    serviceConfig = mkOption { type = types.addCheck (types.attrsOf unitOption) checkService; default = { }; };
    environment = mkOption {
      type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
      default = { };
    };
    path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; };
    script = mkOption { type = types.lines; default = ""; };
    preStart = mkOption { type = types.lines; default = ""; };
    postStart = mkOption { type = types.lines; default = ""; };
  };

  # Only the running system's units are restarted at a switch.
  stage2UnitOptions = {
    restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    reloadTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    restartIfChanged = mkOption { type = types.bool; default = true; };
    reloadIfChanged = mkOption { type = types.bool; default = false; };
    stopIfChanged = mkOption { type = types.bool; default = true; };
    startAt = mkOption { type = types.either types.str (types.listOf types.str); default = [ ]; };
  };

  # lib/systemd-lib.nix's unitConfig module: the dependency lists become
  # [Unit] keys, so a key set twice (a second Description) conflicts.
  unitConfigModule = { config, ... }: {
    config.unitConfig =
      lib.optionalAttrs (config.requires != [ ]) { Requires = toString config.requires; }
      // lib.optionalAttrs (config.wants != [ ]) { Wants = toString config.wants; }
      // lib.optionalAttrs (config.after != [ ]) { After = toString config.after; }
      // lib.optionalAttrs (config.before != [ ]) { Before = toString config.before; }
      // lib.optionalAttrs (config.bindsTo != [ ]) { BindsTo = toString config.bindsTo; }
      // lib.optionalAttrs (config.partOf != [ ]) { PartOf = toString config.partOf; }
      // lib.optionalAttrs (config.conflicts != [ ]) { Conflicts = toString config.conflicts; }
      // lib.optionalAttrs (config.requisite != [ ]) { Requisite = toString config.requisite; }
      // lib.optionalAttrs (config.description != "") { Description = config.description; };
  };

  services = stage2: types.attrsOf (types.submodule [
    { options = commonUnitOptions // lib.optionalAttrs stage2 stage2UnitOptions; }
    unitConfigModule
  ]);

  # ---- users (modules/config/users-groups.nix) --------------------------------

  userType = types.submodule ({ name, config, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      uid = mkOption { type = types.nullOr types.int; default = null; };
      group = mkOption { type = types.str; default = ""; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; };
      homeMode = mkOption { type = types.strMatching "[0-7]{1,5}"; default = "700"; };
      createHome = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      isSystemUser = mkOption { type = types.bool; default = false; };
      description = mkOption { type = types.passwdEntry types.str; default = ""; };
      hashedPassword = mkOption { type = types.nullOr (types.passwdEntry types.str); default = null; };
    };
    config = mkIf config.isNormalUser {
      group = mkDefault "users";
      createHome = mkDefault true;
      home = mkDefault "/home/${config.name}";
    };
  });

  groupType = types.submodule ({ name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      gid = mkOption { type = types.nullOr types.int; default = null; };
      members = mkOption { type = types.listOf (types.passwdEntry types.str); default = [ ]; };
    };
  });

  # ---- filesystems (modules/tasks/filesystems.nix) ---------------------------

  fileSystemType = types.submodule ({ name, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      mountPoint = mkOption {
        type = types.addCheck types.str (l: builtins.match "[^\"\\]+" l != null && (l == "/" || !lib.hasSuffix "/" l));
        default = name;
      };
      device = mkOption { type = types.nullOr types.nonEmptyStr; default = null; };
      label = mkOption { type = types.nullOr types.str; default = null; };
      fsType = mkOption { type = types.nonEmptyStr; default = "auto"; };
      options = mkOption { type = types.nonEmptyListOf types.nonEmptyStr; default = [ "defaults" ]; };
      neededForBoot = mkOption { type = types.bool; default = false; };
      depends = mkOption { type = types.listOf types.nonEmptyStr; default = [ ]; };
      noCheck = mkOption { type = types.bool; default = false; };
    };
  });

  fsTypes = types.coercedTo (types.listOf types.str)
    (enabled: lib.listToAttrs (map (fs: lib.nameValuePair fs true) enabled))
    (types.attrsOf types.bool);

  # ---- etc, initrd contents ---------------------------------------------------

  etcType = types.submodule ({ name, config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.str; default = name; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
      mode = mkOption { type = types.str; default = "symlink"; };
    };
    # modules/system/etc/etc.nix: `text` makes the source.
    config.source = mkIf (config.text != null) (mkDefault (pkgs.writeText (baseNameOf name) config.text));
  });

  initrdContentsType = types.submodule ({ name, config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.path; default = name; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
    };
    config.source = mkIf (config.text != null) (mkDefault (pkgs.writeText "initrd-${baseNameOf name}" config.text));
  });

  # systemd/initrd.nix: a store path (string or package) is coerced to
  # { source = ...; }.
  initrdStorePath = types.listOf (types.coercedTo
    (types.oneOf [ types.singleLineStr types.package ])
    (source: { inherit source; })
    (types.submodule {
      options = {
        enable = mkOption { type = types.bool; default = true; };
        target = mkOption { type = types.nullOr types.path; default = null; };
        source = mkOption { type = types.path; };
      };
    }));

  # ---- activation (modules/system/activation/activation-script.nix) ---------

  scriptType = types.either types.str (types.submodule {
    options = {
      deps = mkOption { type = types.listOf types.str; default = [ ]; };
      text = mkOption { type = types.lines; };
      supportsDryActivation = mkOption { type = types.bool; default = false; };
    };
  });

  # The activation script: every snippet with its headline, in
  # textClosureMap's order (the PATH set-up and lib.sh of nixpkgs left out).
  systemActivationScript = set: onlyDry:
    let
      set' = lib.mapAttrs (_: v: if lib.isString v then (lib.noDepEntry v) // { supportsDryActivation = false; } else v) set;
      withHeadlines = lib.mapAttrs (a: v: v // {
        text = ''
          #### Activation script snippet ${a}:
          _localstatus=0
          ${v.text}

          if (( _localstatus > 0 )); then
            printf "Activation script snippet '%s' failed (%s)\n" "${a}" "$_localstatus"
          fi
        '';
      }) set';
      withDrySnippets = lib.mapAttrs (a: v: if onlyDry && !v.supportsDryActivation then v // {
        text = "#### Activation script snippet ${a} does not support dry activation.";
      } else v) withHeadlines;
    in
    ''
      #!/bin/sh
      systemConfig='@out@'

      _status=0
      trap "_status=1 _localstatus=\$?" ERR

      # Ensure a consistent umask.
      umask 0022

      ${lib.textClosureMap lib.id withDrySnippets (lib.attrNames withDrySnippets)}
    '' + lib.optionalString (!onlyDry) ''
      exit $_status
    '';

  usersCfg = config.users;
  accountsFromUnits = config.services.userborn.enable || config.systemd.sysusers.enable;
in
{
  options = {
    system.stateVersion = mkOption { type = types.str; default = "26.05"; };
    system.activationScripts = mkOption {
      type = types.attrsOf scriptType;
      default = { };
      apply = set: set // { script = systemActivationScript set false; };
    };
    system.dryActivationScript = mkOption { type = types.str; readOnly = true; };
    system.etc.overlay.enable = mkOption { type = types.bool; default = false; };

    users.users = mkOption { type = types.attrsOf userType; default = { }; };
    users.groups = mkOption { type = types.attrsOf groupType; default = { }; };
    users.mutableUsers = mkOption { type = types.bool; default = true; };

    services.userborn.enable = mkOption { type = types.bool; default = false; };
    systemd.sysusers.enable = mkOption { type = types.bool; default = false; };

    fileSystems = mkOption {
      type = types.attrsOf fileSystemType;
      default = { };
      apply = lib.filterAttrs (_: fs: fs.enable);
    };

    environment.etc = mkOption { type = types.attrsOf etcType; default = { }; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    systemd.services = mkOption { type = services true; default = { }; };
    systemd.mounts = mkOption { type = types.listOf (types.attrsOf types.anything); default = [ ]; };
    # modules/system/boot/systemd.nix's timers: what a timer unit sets.
    systemd.timers = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          description = mkOption { type = types.str; default = ""; };
          wantedBy = mkOption { type = types.listOf unitNameType; default = [ ]; };
          timerConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
          unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
        };
      });
      default = { };
    };

    boot.supportedFilesystems = mkOption { type = fsTypes; default = { }; };
    boot.initrd = {
      supportedFilesystems = mkOption { type = fsTypes; default = { }; };
      verbose = mkOption { type = types.bool; default = true; };
      systemd = {
        # nixpkgs 26.05 (nixpkgs#435781): the systemd initrd is the default.
        enable = mkOption { type = types.bool; default = true; };
        contents = mkOption { type = types.attrsOf initrdContentsType; default = { }; };
        storePaths = mkOption { type = initrdStorePath; default = [ ]; };
        services = mkOption { type = services false; default = { }; };
        mounts = mkOption { type = types.listOf (types.attrsOf types.anything); default = [ ]; };
        suppressedUnits = mkOption { type = types.listOf types.str; default = [ ]; };
      };
    };
  };

  config = {
    users.users.root = { uid = 0; group = "root"; home = "/root"; description = "System administrator"; };
    users.users.nobody = { uid = 65534; group = "nogroup"; isSystemUser = true; };
    users.groups = { root.gid = 0; wheel.gid = 1; users.gid = 100; nogroup.gid = 65534; };

    # NixOS's own snippets that others order themselves after; the users
    # snippet is empty when userborn or systemd-sysusers make the accounts.
    system.activationScripts = {
      specialfs = "# specialfs";
      users = if accountsFromUnits then "" else { deps = [ ]; text = "# users"; supportsDryActivation = true; };
      groups = { deps = [ "users" ]; text = "# groups"; };
      etc = { deps = [ "users" "groups" ]; text = "# etc"; };
    };
    system.dryActivationScript = systemActivationScript (removeAttrs config.system.activationScripts [ "script" ]) true;

    systemd.services.userborn = mkIf config.services.userborn.enable {
      wantedBy = [ "sysinit.target" ];
      requiredBy = [ "sysinit-reactivation.target" ];
      after = [ "systemd-remount-fs.service" "systemd-tmpfiles-setup-dev-early.service" ];
      before = [ "systemd-tmpfiles-setup-dev.service" "sysinit.target" "shutdown.target" "sysinit-reactivation.target" ];
      conflicts = [ "shutdown.target" ];
      unitConfig.DefaultDependencies = false;
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    };
    systemd.services.systemd-sysusers = mkIf config.systemd.sysusers.enable {
      wantedBy = [ "sysinit.target" ];
      requiredBy = [ "sysinit-reactivation.target" ];
      before = [ "sysinit-reactivation.target" ];
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    };

    assertions = [
      {
        assertion = !(config.services.userborn.enable && config.systemd.sysusers.enable);
        message = "You cannot use both services.userborn and systemd.sysusers.";
      }
      {
        assertion = config.systemd.sysusers.enable -> (!usersCfg.mutableUsers || config.system.etc.overlay.enable);
        message = "systemd-sysusers with mutable users needs system.etc.overlay.enable.";
      }
    ] ++ lib.concatLists (lib.mapAttrsToList (name: user: [
      {
        assertion = lib.xor (user.isSystemUser || (user.uid != null && user.uid < 1000)) user.isNormalUser;
        message = "Exactly one of users.users.${user.name}.isSystemUser and users.users.${user.name}.isNormalUser must be set.";
      }
      {
        assertion = user.group != "";
        message = ''
          users.users.${user.name}.group is unset. This used to default to
          nogroup, but this is unsafe. For example you can create a group
          for this user with:
          users.users.${user.name}.group = "${user.name}";
          users.groups.${user.name} = {};
        '';
      }
    ]) usersCfg.users);
  };
}
